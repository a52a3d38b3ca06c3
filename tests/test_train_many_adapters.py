"""train/bank.py through train/run.py: k LoRA adapters trained together on one frozen base
(``lora.num_adapters``) equal k separate runs, and the settings they refuse."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import lora_jax as lj
import models
from studies.e2e import experiment as experiment_lib
from train import adapter as adapter_lib
from train import export as export_lib
from train import layout
from train.cli import main
from train.config import ConfigError, config_to_yaml, load_config
from train.loop import DivergenceError
from train.metrics import read_records
from train.plot import loss_lines
from train.run import train

import tolerances as tol
import train_fixtures as tf

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")

RATES = (1e-2, 3e-3, 1e-3)
# dropout: each adapter must draw its separate run's masks; no remat: the step compiles in
# 2/3 of the time (remat is the model's business, not the bank's)
SETTINGS = ("lora.dropout=0.1", "checkpoint.every_steps=0", "model.remat=none")
# tiny_config's run: the tiny Llama over 40 keys with rank-4 LoRA, 8 rows of 40 tokens.
FORWARD = tol.decoder_depth(
    layers=tf.LAYERS, hidden=tf.HIDDEN, mlp=tf.MLP, head_dim=tf.HEAD_DIM, keys=40, rank=4
)


def run_atol(updates: int, scale: float) -> float:
    """Two runs that differ in the order of float32 reductions only (vmap batches the
    adapters' matmuls, so XLA may sum in another order): the chain of a loss or parameter
    after ``updates`` updates of 8 x 40 tokens (tolerances.train_depth, as
    tests/test_train_mesh.py bounds 8 devices against 1). Measured: adapters and losses
    differ by 1/300 to 1/3000 of it; adapter 0 against adapter 1's run by 1500x it."""
    return tol.chain_atol(tol.train_depth(FORWARD, tf.VOCAB, 8 * 40, updates), scale)


def adapter_leaves(directory, base):
    """The saved adapter's LoRA leaves {path: array}, loaded onto ``base``."""
    return {
        p: np.asarray(v)
        for p, v in lj.flatten_paths(lj.adapter(adapter_lib.load_adapter(directory, base))).items()
    }


def logged_losses(run_dir, split):
    return [r["loss"] for r in read_records(run_dir / layout.METRICS_FILE) if r["split"] == split]


def test_k_adapters_trained_together_equal_k_separate_runs(run_files):
    model_dir, csv, root = run_files
    rates = f"optim.learning_rates=[{','.join(map(str, RATES))}]"
    cfg = tf.tiny_config(model_dir, csv, root / "together", "lora.num_adapters=3", rates, *SETTINGS)
    # stopped after 3 of 6 updates and resumed: the checkpoint holds the whole bank
    assert train(cfg, stop_after=3, **tf.QUIET).step == 3
    together = train(cfg, **tf.QUIET)
    alone = [
        # adapter j's separate run: its rate, the init seed the bank gave it (seed + j)
        train(
            tf.tiny_config(
                model_dir,
                csv,
                root / f"alone_{j}",
                f"optim.learning_rate={rate}",
                f"lora.init_seeds=[{j}]",
                *SETTINGS,
            ),
            **tf.QUIET,
        )
        for j, rate in enumerate(RATES)
    ]
    info = json.loads((root / "together" / layout.RUN_INFO_FILE).read_text())
    assert [(a["directory"], a["learning_rate"]) for a in info["adapters"]] == [
        (f"adapter_{j}", rate) for j, rate in enumerate(RATES)
    ]
    base = models.load(str(model_dir))[1]
    for j, (adapter, single) in enumerate(zip(together.adapters, alone, strict=True)):
        assert adapter.directory == root / "together" / f"adapter_{j}"
        assert adapter.learning_rate == RATES[j]
        ours = adapter_leaves(adapter.directory, base)
        theirs = adapter_leaves(single.adapters[0].directory, base)
        assert ours.keys() == theirs.keys()
        for path, expected in theirs.items():
            tol.assert_close(
                ours[path], expected, run_atol(6, tol.scale_of(expected)), f"adapter {j} {path}"
            )
        loss = single.validation_after["loss"]
        tol.assert_close(
            adapter.validation_after["loss"], loss, run_atol(6, loss), f"adapter {j} val"
        )
        # the logged training losses, update by update (loss k after k - 1 updates)
        split = f"train/adapter_{j}"
        for k, (a, b) in enumerate(
            zip(logged_losses(root / "together", split), logged_losses(single.run_dir, "train"))
        ):
            tol.assert_close(a, b, run_atol(k, b), f"adapter {j} train loss {k + 1}")
    # its loss curve draws every adapter's training and validation losses
    lines = loss_lines(read_records(root / "together" / layout.METRICS_FILE))
    names = [f"{split}/adapter_{j}" for split in ("train", "validation") for j in range(3)]
    assert list(lines) == names
    for name in names:
        assert lines[name][1] == logged_losses(root / "together", name)
    png = (root / "together" / layout.LOSS_CURVE_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # lora-jax experiment reads each adapter as the run at its rate (grid_in_one_process)
    process = {"peak_rss_bytes": 1, "wall_s": 1.0}  # what the experiment's process wrapper writes
    for directory in (root / "together", alone[0].run_dir):
        (directory / experiment_lib.PROCESS_FILE).write_text(json.dumps(process))
    single_summary = experiment_lib.run_summary(alone[0].run_dir)
    for j, adapter in enumerate(together.adapters):
        summary = experiment_lib.run_summary(root / "together", adapter=j)
        assert summary["validation_loss"] == adapter.validation_after["loss"]
        assert summary["trained_together"] == 3
        for key in ("trainable_params", "optimizer_state_bytes"):  # one adapter's share
            assert summary[key] == single_summary[key]
    # commands that take one adapter name the adapters of such a run
    with pytest.raises(
        adapter_lib.AdapterError, match=r"a run of 3 adapters; give one of them, e.g. .*adapter_0"
    ):
        export_lib.adapter_dir(root / "together")
    # the bound tells the rates apart: adapter 0 is not adapter 1's separate run
    ours = adapter_leaves(together.adapters[0].directory, base)
    theirs = adapter_leaves(alone[1].adapters[0].directory, base)
    assert not all(tol.close(ours[p], e, run_atol(6, tol.scale_of(e))) for p, e in theirs.items())


def test_one_diverging_adapter_stops_the_run_naming_it_and_saves_nothing(run_files):
    model_dir, csv, root = run_files
    cfg = tf.tiny_config(
        model_dir,
        csv,
        root / "one_wild",
        "lora.num_adapters=2",
        "optim.learning_rates=[1e-2,1e6]",  # 1e6: A blows up at the first update
        "optim.warmup_steps=0",
        "checkpoint.every_steps=1",
        "model.remat=none",
    )
    with pytest.raises(
        DivergenceError,
        match=r"diverged at step 1: parameters reached .* of adapter 1 "
        r"\(optim.learning_rates\[1\] = 1e\+06\).*No checkpoint was saved yet",
    ):
        train(cfg, **tf.QUIET)
    assert not any((root / "one_wild").glob("adapter*"))


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (
            ["lora.num_adapters=2", "optim.learning_rates=[1e-3]"],
            "optim.learning_rates has 1 value(s) for lora.num_adapters=2",
        ),
        (["lora.init_seeds=[1, 2]"], "lora.init_seeds has 2 value(s) for lora.num_adapters=1"),
        (["lora.num_adapters=2", "method=full"], "method=full has no adapters; set method=lora"),
        (["lora.num_adapters=2", "method=bitfit"], "method=bitfit has no adapters"),
        (["lora.num_adapters=2", "lora.bias=all"], "no bias deltas; set lora.bias=none"),
        (
            ["lora.num_adapters=2", "optim.learning_rates=[1e-3, -1e-3]"],
            "optim.learning_rates must be >= 0",
        ),
        (["lora.num_adapters=0"], "'lora.num_adapters' must be >= 1"),
    ],
)
def test_adapter_settings_that_cannot_work_are_refused_in_one_line(overrides, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_experiment_trains_a_learning_rate_grid_in_one_process(tmp_path, run_files, monkeypatch):
    model_dir, csv, _ = run_files
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    base = tmp_path / "base.yaml"
    base.write_text(config_to_yaml(tf.tiny_config(model_dir, csv, tmp_path / "unused")))
    experiment = {
        "base_config": str(base),
        "data": str(csv),
        "test_fraction": 0.25,
        "output_dir": str(tmp_path / "out"),
        "report": str(tmp_path / "results.md"),
        "plot": str(tmp_path / "results.png"),
        "overrides": ["optim.max_steps=3", "checkpoint.every_steps=0"],
        "select": "validation_loss",
        "grid_in_one_process": True,
        "eval": {"greedy": True, "batch_size": 4, "max_new_tokens": 3, "limit": 2},
        "methods": [{"name": "lora-qv", "learning_rates": [1e-4, 3e-2]}],
    }
    (tmp_path / "experiment.yaml").write_text(json.dumps(experiment))  # JSON is YAML
    assert main(["experiment", str(tmp_path / "experiment.yaml")]) == 0
    grid_dir = tmp_path / "out" / "runs" / "lora-qv" / "lr_grid"
    run = load_config(grid_dir / layout.CONFIG_FILE)
    assert run.lora.num_adapters == 2 and run.optim.learning_rates == (1e-4, 3e-2)
    assert run.lora.init_seeds == (run.seed, run.seed)  # each adapter as its rate's own run
    finals = {
        lr: logged_losses(grid_dir, f"validation/adapter_{j}")[-1]
        for j, lr in enumerate((1e-4, 3e-2))
    }
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    chosen = min(finals, key=finals.get)
    assert row["learning_rate"] == chosen and row["validation_loss"] == finals[chosen]
    assert row["run_dir"] == str(grid_dir / f"adapter_{(1e-4, 3e-2).index(chosen)}")
    assert row["learning_rate_grid"] == {f"{lr:g}": loss for lr, loss in finals.items()}
    assert row["trained_together"] == 2
    assert "lora-qv: the learning rates trained together" in (tmp_path / "results.md").read_text()
