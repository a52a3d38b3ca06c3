"""studies/e2e/experiment.py: ``lora-jax experiment`` end to end on a tiny model, and its report."""

from __future__ import annotations

import csv
import json
import re

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from studies.e2e import experiment as experiment_lib
from studies.e2e.experiment import (
    _edge,
    across_seeds,
    check_outputs,
    choose,
    fresh_start,
    load_experiment,
    paired_difference,
    ratios,
    run_config,
    split_test,
    table,
)
from train import method as method_lib
from train import rundir
from train.cli import main
from train.config import ConfigError, config_to_yaml, load_config

import train_fixtures as tf

RANK, LAYERS, HIDDEN = 2, tf.LAYERS, tf.HIDDEN


def _write_experiment(tmp_path, model_dir, csv_path, **extra) -> str:
    base = tmp_path / "base.yaml"
    base.write_text(config_to_yaml(tf.tiny_config(model_dir, csv_path, tmp_path / "unused")))
    experiment = {
        "base_config": str(base),
        "data": str(csv_path),
        "test_fraction": 0.25,
        "seed": 1,
        "output_dir": str(tmp_path / "out"),
        "report": str(tmp_path / "docs" / "results.md"),
        "plot": str(tmp_path / "docs" / "results.png"),
        "overrides": ["optim.max_steps=3", "checkpoint.every_steps=0"],
        "select": "validation_loss",
        "eval": {"greedy": True, "batch_size": 4, "max_new_tokens": 3},
        "methods": [
            {"name": "zero-shot"},
            {"name": "lora-qv", "overrides": [f"lora.rank={RANK}"], "learning_rates": [1e-4, 3e-2]},
        ],
        **extra,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(json.dumps(experiment))  # JSON is YAML
    return str(path)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_test_split_is_by_mr_and_keeps_every_row(tmp_path):
    csv_path = tf.write_csv(tmp_path / "e2e.csv")
    trainval, test, counts = split_test(csv_path, 0.25, 0, tmp_path / "split")
    every, trainval_rows, test_rows = _rows(csv_path), _rows(trainval), _rows(test)
    assert {r["mr"] for r in trainval_rows}.isdisjoint({r["mr"] for r in test_rows})
    assert sorted(map(tuple, (r.values() for r in trainval_rows + test_rows))) == sorted(
        map(tuple, (r.values() for r in every))
    )
    assert counts["test_mrs"] == 4 and counts["trainval_mrs"] == 12  # 0.25 of 16 MRs
    assert counts["test_rows"] == len(test_rows)


@pytest.mark.slow
def test_experiment_trains_chooses_on_validation_and_reports(
    tmp_path, run_files, monkeypatch, capsys
):
    model_dir, csv_path, _ = run_files
    # the runs are subprocesses: share a compilation cache between them
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
    config = _write_experiment(tmp_path, model_dir, csv_path)
    assert main(["experiment", config]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    zero_shot, lora = results["rows"]
    assert [zero_shot["method"], lora["method"]] == ["zero-shot", "lora-qv"]

    # the learning rate is the one with the lowest final validation loss, read off the runs
    finals = {}
    for lr in (1e-4, 3e-2):
        records = [
            json.loads(line)
            for line in (out / "runs" / "lora-qv" / f"lr_{lr:g}" / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        finals[lr] = [r["loss"] for r in records if r["split"] == "validation"][-1]
    assert lora["learning_rate"] == min(finals, key=finals.get)
    assert finals[3e-2] != finals[1e-4]

    # closed forms: r·(in + out) per q and v kernel; AdamW keeps two f32 moments each
    q_out, v_out = tf.HEADS * tf.HEAD_DIM, tf.KV_HEADS * tf.HEAD_DIM
    assert lora["trainable_params"] == LAYERS * RANK * (2 * HIDDEN + q_out + v_out)
    assert (
        8 * lora["trainable_params"]
        <= lora["optimizer_state_bytes"]
        <= 8 * lora["trainable_params"] + 64
    )
    assert zero_shot["trainable_params"] == 0
    assert zero_shot["validation_loss"] == lora["validation_loss_before"]
    assert lora["adapter_bytes"] > 0 and lora["peak_rss_bytes"] > 2**20 and lora["step_s"] > 0

    # every test MR decoded by `lora-jax eval` for both rows, scores in the fixed format
    test_mrs = results["data"]["test_mrs"]
    for name in ("zero-shot", "lora-qv"):
        lines = (out / "eval" / name / "predictions.txt").read_text().splitlines()
        assert len(lines) == test_mrs
        assert set(json.loads((out / "eval" / name / "scores.json").read_text())) == {
            "BLEU",
            "NIST",
            "METEOR",
            "ROUGE_L",
            "CIDEr",
        }
    report = (tmp_path / "docs" / "results.md").read_text()
    assert (
        "| zero-shot | - | 0 |" in report and f"| lora-qv | {lora['learning_rate']:g} |" in report
    )
    assert f"lora-jax experiment {config}" in report
    assert (tmp_path / "docs" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # batch-1 latency, side by side: no `reference` row (full) here, so the first row's;
    # its ratio to itself is 1 in every round
    assert zero_shot["latency_vs_reference"] == 1.0 and lora["latency_ms_per_token"] > 0
    latency = json.loads((out / "latency.json").read_text())
    assert latency["reference"] == "zero-shot" and set(latency["rows"]) == {"zero-shot", "lora-qv"}
    assert "| ms / token, batch 1 | vs zero-shot |" in report and "*ms / token, batch 1*" in report

    # a second call reuses the finished runs (and the latency); a changed grid point is
    # refused, not overwritten
    predictions = out / "eval" / "lora-qv" / "predictions.txt"
    decoded_at = predictions.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["experiment", config]) == 0
    assert capsys.readouterr().out.count("(finished run reused)") == 2
    assert json.loads((out / "latency.json").read_text()) == latency
    assert predictions.stat().st_mtime_ns == decoded_at  # the decoded outputs too
    # outputs decoded under other defaults of the eval command (here: an n-gram ban over
    # the prompt too, as before it followed the paper) are decoded again
    eval_key = out / "eval" / "lora-qv" / "eval_args.json"
    stale = json.loads(eval_key.read_text())
    stale["decoding"]["no_repeat_ngram_scope"] = "sequence"
    eval_key.write_text(json.dumps(stale))
    assert main(["experiment", config]) == 0
    assert predictions.stat().st_mtime_ns != decoded_at
    assert json.loads(eval_key.read_text())["decoding"]["no_repeat_ngram_scope"] == "output"
    changed = _write_experiment(
        tmp_path, model_dir, csv_path, overrides=["optim.max_steps=4", "checkpoint.every_steps=0"]
    )
    assert main(["experiment", changed]) == 2
    assert "holds a finished run with another config" in capsys.readouterr().err
    assert len(finals) == 2 and (out / "runs" / "lora-qv" / "lr_0.03" / "adapter").is_dir()

    # chosen by validation BLEU instead: the same runs, each decoded on its validation MRs
    by_bleu = _write_experiment(tmp_path, model_dir, csv_path, select="validation_bleu")
    assert main(["experiment", by_bleu]) == 0
    lora = json.loads((out / "results.json").read_text())["rows"][1]
    bleu = {}
    for lr in (1e-4, 3e-2):
        run_dir = out / "runs" / "lora-qv" / f"lr_{lr:g}"
        bleu[lr] = json.loads((run_dir / "validation_eval" / "scores.json").read_text())["BLEU"]
        held_out = json.loads((run_dir / "run_info.json").read_text())["data"]
        decoded = (run_dir / "validation_eval" / "predictions.txt").read_text().splitlines()
        assert len(decoded) == held_out["validation_groups"]  # the MRs the run held out
    assert lora["learning_rate"] == max(bleu, key=lambda lr: (bleu[lr], -finals[lr]))
    assert lora["learning_rate_grid_bleu"] == {f"{lr:g}": b for lr, b in bleu.items()}
    validation_mrs = {r["mr"] for r in _rows(next(out.glob("validation_*.csv")))}
    assert validation_mrs and validation_mrs <= {r["mr"] for r in _rows(out / "trainval.csv")}
    assert validation_mrs.isdisjoint({r["mr"] for r in _rows(out / "test.csv")})
    assert "the highest BLEU" in (tmp_path / "docs" / "results.md").read_text()

    # another seed at the chosen rate: a new run, decoded on the test MRs; the row averages
    seeded = json.loads((tmp_path / "experiment.yaml").read_text())
    seeded["methods"][1]["seeds"] = [7]
    (tmp_path / "experiment.yaml").write_text(json.dumps(seeded))
    assert main(["experiment", by_bleu]) == 0
    lora = json.loads((out / "results.json").read_text())["rows"][1]
    seed_dir = out / "runs" / "lora-qv" / f"lr_{lora['learning_rate']:g}_seed7"
    assert load_config(seed_dir / "config.yaml").seed == 7 and lora["seed"] == 0
    runs = [
        json.loads((out / "eval" / "lora-qv" / sub / "scores.json").read_text())
        for sub in (".", "seed7")
    ]
    assert lora["seed_scores"] == {"0": runs[0], "7": runs[1]}
    assert lora["scores"]["BLEU"] == pytest.approx((runs[0]["BLEU"] + runs[1]["BLEU"]) / 2)
    assert lora["scores_sd"]["BLEU"] == pytest.approx(
        abs(runs[0]["BLEU"] - runs[1]["BLEU"]) / 2**0.5
    )
    assert "## Seeds" in (tmp_path / "docs" / "results.md").read_text()

    # another experiment decodes these runs instead of training (runs_from): it writes
    # nothing into them, and decoding as this one does gives the same outputs
    def files(root):
        return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    before = files(out)
    # (the chosen rate only: nothing to choose, so only the test MRs are decoded)
    decoder = seeded | {
        "methods": [seeded["methods"][1] | {"learning_rates": [lora["learning_rate"]]}],
        "output_dir": str(tmp_path / "decoder"),
        "runs_from": str(out),
        "report": str(tmp_path / "decoder_docs" / "results.md"),
        "plot": str(tmp_path / "decoder_docs" / "results.png"),
        "latency": {"new_tokens": 0},
    }
    decoder_config = tmp_path / "decoder.yaml"
    decoder_config.write_text(json.dumps(decoder))
    capsys.readouterr()
    assert main(["experiment", str(decoder_config)]) == 0
    assert f"decoding the runs of {out}" in capsys.readouterr().out
    assert files(out) == before
    decoded = json.loads((tmp_path / "decoder" / "results.json").read_text())["rows"][0]
    assert decoded["run_dir"] == lora["run_dir"] and decoded["seed_scores"] == lora["seed_scores"]
    for sub in (".", "seed7"):
        ours, theirs = (
            (root / "eval" / "lora-qv" / sub / "predictions.txt").read_text()
            for root in (tmp_path / "decoder", out)
        )
        assert ours == theirs
    assert not (tmp_path / "decoder" / "runs").exists()  # nothing trained there
    # a run the other experiment lacks is not trained; a differently split one is refused
    decoder["methods"][0]["seeds"] = [7, 8]
    decoder_config.write_text(json.dumps(decoder))
    assert main(["experiment", str(decoder_config)]) == 2
    assert "holds no finished run" in capsys.readouterr().err
    assert files(out) == before
    decoder_config.write_text(json.dumps(decoder | {"test_fraction": 0.5}))
    assert main(["experiment", str(decoder_config)]) == 2
    assert "split the data differently" in capsys.readouterr().err


def test_bad_experiment_configs_name_the_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(config_to_yaml(load_config(None)))
    path = tmp_path / "e.yaml"
    path.write_text(f"base_config: {base}\nmethods: [{{name: a, overrides: [lora.rnak=2]}}]\n")
    with pytest.raises(ConfigError, match="did you mean 'lora.rank'"):
        load_experiment(path)
    path.write_text(f"base_config: {base}\nmethod: []\n")
    with pytest.raises(ConfigError, match="method"):
        load_experiment(path)
    path.write_text(f"base_config: {base}\nmethods: [{{name: a}}, {{name: a}}]\n")
    with pytest.raises(ConfigError, match="distinct names"):
        load_experiment(path)


def test_methods_keeps_the_named_rows_in_the_configs_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(config_to_yaml(load_config(None)))
    path = tmp_path / "e.yaml"
    path.write_text(f"base_config: {base}\nmethods: [{{name: a}}, {{name: b}}, {{name: c}}]\n")
    assert [m.name for m in load_experiment(path, methods=["c", "a"]).methods] == ["a", "c"]
    assert [m.name for m in load_experiment(path).methods] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"no method named 'd'; pass --methods from \['a'"):
        load_experiment(path, methods=["a", "d"])


def test_table_and_ratios_state_the_measured_figures():
    full = {
        "method": "full",
        "learning_rate": 1e-4,
        "base_params": 1000,
        "trainable_params": 1000,
        "adapter_bytes": 4 * 2**20,
        "optimizer_state_bytes": 8000,
        "peak_rss_bytes": 3 * 2**30,
        "step_s": 2.0,
        "validation_loss": 1.5,
        "scores": {"BLEU": 60.0, "NIST": 8.0, "METEOR": 0.4, "ROUGE_L": 0.6, "CIDEr": 2.0},
    }
    lora = {
        **full,
        "method": "lora",
        "trainable_params": 10,
        "adapter_bytes": 2**12,
        "optimizer_state_bytes": 80,
        "peak_rss_bytes": 2**30,
        "scores": {**full["scores"], "BLEU": 61.5},
    }
    rows = table([full, lora])
    assert rows[3].startswith("| lora | 0.0001 | 10 | 1.000 | 4.0 KiB | 80 B")
    assert "| 61.50 | 8.00 | 40.00 | 60.00 | 2.00 |" in rows[3]
    assert ratios([full, lora]) == [
        "- lora: saved 1,024x smaller, optimizer state 100x "
        "smaller, peak RSS 3.00x lower, BLEU +1.50 vs full "
        "fine-tuning"
    ]
    # another reference row, named by the experiment config's `reference`
    assert ratios([{**full, "method": "top2"}, lora], "top2")[0].endswith("BLEU +1.50 vs top2")
    assert ratios([lora], "top2") == ["(no row named `top2`, the experiment's `reference`)"]
    # a row larger than the reference (rank 64 against rank 8) says so, not "0x smaller";
    # below 10x with two decimals (1.3x is not "1x"), equal bytes are "the same"
    larger = {**lora, "method": "r64", "adapter_bytes": 13 * 2**12 // 10, "peak_rss_bytes": 2**31}
    assert ratios([lora, larger], "lora")[0].startswith(
        "- r64: saved 1.30x larger, optimizer state the same, peak RSS 2.00x higher,"
    )


def test_the_difference_paired_by_seed_and_its_standard_error():
    def row(bleus):
        return {"seed_scores": {s: {"BLEU": b} for s, b in bleus.items()}}

    lora, full = row({"0": 62.0, "1": 60.0, "2": 61.0}), row({"0": 61.0, "1": 61.0, "2": 59.0})
    # differences +1, -1, +2: mean 2/3, sample sd sqrt(7/3), SE sqrt(7/3)/sqrt(3) = 0.882
    assert paired_difference(lora, full) == (
        "; paired by seed (0: +1.00, 1: -1.00, 2: +2.00): +0.67 ± 0.88 (SE)"
    )
    assert paired_difference(row({"0": 62.0, "3": 60.0}), full) == ""  # not the same seeds
    assert paired_difference(row({"0": 62.0}), row({"0": 61.0})) == ""  # one pair: no SE
    assert paired_difference({}, full) == ""


def test_one_learning_rate_is_chosen_without_validation_scores():
    assert choose({3e-3: {"validation_loss": None}}, "validation_bleu") == 3e-3


def test_the_parity_experiment_trains_the_shipped_configs_as_shipped(tmp_path):
    # docs/parity.md's claim is about configs/e2e_{lora,full}.yaml: the experiment may
    # change what is validated and saved, never what is trained. A row with overrides (a
    # lever tried on LoRA, as in e2e_parity_levers.yaml) may change the optimiser only.
    parity = load_experiment(tf.REPO_ROOT / "configs/experiments/e2e_parity.yaml")
    assert {m.config for m in parity.methods} == {"configs/e2e_lora.yaml", "configs/e2e_full.yaml"}
    as_shipped = {m.config for m in parity.methods if not m.overrides}
    assert as_shipped == {"configs/e2e_lora.yaml", "configs/e2e_full.yaml"}
    for method in parity.methods:
        assert len(method.seeds) >= 2  # >= 3 runs each
        assert all(o.startswith("optim.") for o in method.overrides), method.name
        shipped = load_config(tf.REPO_ROOT / method.config)
        (rate,) = method.learning_rates
        run = run_config(parity, method, rate, tmp_path / "data.csv", tmp_path / "run")
        assert run.data.path == str(tmp_path / "data.csv")
        sections = ("method", "seed", "model", "lora", "adapter")
        for section in (*sections, *(() if method.overrides else ("optim",))):
            assert getattr(run, section) == getattr(shipped, section), section
        data = ("validation_fraction", "max_length", "batch_size", "packing", "format")
        assert [getattr(run.data, k) for k in data] == [getattr(shipped.data, k) for k in data]


def test_the_which_weights_rows_adapt_equal_budgets(tmp_path):
    # the paper's Table 5 compares weight types at one trainable budget: on SmolLM2-135M's
    # shapes (read from its GGUF header), every row of e2e_which_weights.yaml adapts as many
    # parameters, and each the weights its name says
    path = tf.REPO_ROOT / "configs/experiments/e2e_which_weights.yaml"
    which = load_experiment(path)
    counts = {}
    for method in which.methods:
        run = run_config(which, method, 3e-3, tmp_path / "d.csv", tmp_path / "r")
        _, base = models.abstract_load(run.model.name, **method_lib.model_options(run))
        shapes, mask = method_lib.prepared_shapes(run.method, base, run.lora)
        _, trainable = lj.split(shapes, mask)
        counts[method.name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
        adapted = {p.split("/")[-2] for p in lj.flatten_paths(trainable)}
        assert adapted == {f"{w}_proj" for w in method.name.split("-")}, method.name
    assert len(set(counts.values())) == 1, counts
    assert counts["q"] == 30 * 9216  # 30 layers, W_q r=8: 8·(576 + 576) each


def test_several_seeds_report_mean_and_sample_deviation():
    runs = [
        {"BLEU": 60.0, "METEOR": None},
        {"BLEU": 62.0, "METEOR": 0.5},
        {"BLEU": 64.0, "METEOR": 0.6},
    ]
    mean, sd = across_seeds(runs)
    assert mean == {"BLEU": 62.0, "METEOR": None} and sd == {"BLEU": 2.0, "METEOR": None}
    assert across_seeds(runs[1:2]) == (
        {"BLEU": 62.0, "METEOR": 0.5},
        {"BLEU": None, "METEOR": None},
    )
    row = {
        "method": "lora",
        "learning_rate": 1e-3,
        "base_params": 100,
        "trainable_params": 1,
        "scores": {"BLEU": 62.0, "NIST": 8.0, "METEOR": 0.45},
        "scores_sd": {"BLEU": 2.0, "NIST": None, "METEOR": 0.01},
    }
    assert "| 62.00 ± 2.00 | 8.00 | 45.00 ± 1.00 | null |" in table([row])[2]  # METEOR x100


@pytest.mark.parametrize(
    "seeds, problem", [([0], "differ from the run config's seed (0)"), ([1, 1], "distinct")]
)
def test_seeds_must_be_new_runs(tmp_path, seeds, problem):
    base = tmp_path / "base.yaml"
    base.write_text(config_to_yaml(load_config(None)))  # seed 0
    path = tmp_path / "e.yaml"
    path.write_text(
        f"base_config: {base}\nmethods: [{{name: a, learning_rates: [1.0e-3], seeds: {seeds}}}]\n"
    )
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_experiment(path)


@pytest.mark.parametrize(
    "path", sorted(tf.REPO_ROOT.glob("configs/experiments/*.yaml")), ids=lambda p: p.name
)
def test_shipped_experiment_configs_load(path):
    cfg = load_experiment(path)
    assert cfg.methods and all(m.learning_rates or m.name == "zero-shot" for m in cfg.methods)


def test_the_quick_table_runs_the_full_tables_methods_at_rates_of_their_grids():
    experiments = tf.REPO_ROOT / "configs" / "experiments"
    full = {m.name: m for m in load_experiment(experiments / "e2e_table.yaml").methods}
    quick = load_experiment(experiments / "e2e_table_quick.yaml")
    assert [m.name for m in quick.methods] == list(full)
    for method in quick.methods:
        assert method.overrides == full[method.name].overrides and not method.seeds
        assert set(method.learning_rates) <= set(full[method.name].learning_rates)
        assert len(method.learning_rates) == (1 if full[method.name].learning_rates else 0)


def test_an_experiment_extends_another_replacing_only_what_it_sets(tmp_path):
    parent = tf.REPO_ROOT / "configs" / "experiments" / "e2e_table.yaml"
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent}\noutput_dir: elsewhere\nmethods: [{{name: zero-shot}}]\n")
    base, extended = load_experiment(parent), load_experiment(child)
    assert extended.output_dir == "elsewhere" and [m.name for m in extended.methods] == [
        "zero-shot"
    ]
    assert (extended.overrides, extended.eval, extended.data) == (
        base.overrides,
        base.eval,
        base.data,
    )
    child.write_text(f"extends: {tmp_path / 'none.yaml'}\n")
    with pytest.raises(ConfigError, match="none.yaml, which does not exist"):
        load_experiment(child)


def test_choose_by_bleu_breaks_ties_on_loss_and_by_loss_ignores_bleu():
    candidates = {
        1e-3: {"validation_loss": 1.5, "validation_bleu": 60.0},
        3e-3: {"validation_loss": 1.4, "validation_bleu": 60.0},
        1e-2: {"validation_loss": 1.3, "validation_bleu": 50.0},
    }
    assert choose(candidates, "validation_bleu") == 3e-3
    assert choose(candidates, "validation_loss") == 1e-2


def test_a_rate_at_the_edge_of_its_grid_is_flagged():
    grid = {"0.001": 1.5, "0.003": 1.4, "0.01": 1.6}
    assert _edge(0.003, grid) == ""
    assert "larger rate may be better" in _edge(0.01, grid)
    assert "smaller rate may be better" in _edge(0.001, grid)
    assert _edge(0.001, {"0.001": 1.5}) == ""


# ---------------------------------------------------------------------------- trust


def _quick_experiment(tmp_path, **extra) -> str:
    """An experiment config that fails or is refused before any training would start."""
    base = tmp_path / "base.yaml"
    base.write_text(config_to_yaml(load_config(None)))
    experiment = {
        "base_config": str(base),
        "data": str(tf.write_csv(tmp_path / "e2e.csv")),
        "output_dir": str(tmp_path / "out"),
        "report": str(tmp_path / "docs" / "results.md"),
        "plot": str(tmp_path / "docs" / "results.png"),
        "methods": [{"name": "zero-shot"}],
        **extra,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(json.dumps(experiment))
    return str(path)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "x y", "/abs", ""])
def test_method_names_are_safe_directory_names(tmp_path, name):
    path = _quick_experiment(tmp_path, methods=[{"name": name, "learning_rates": [1e-3]}])
    with pytest.raises(
        ConfigError, match=re.escape(f"method name {name!r} is used as a directory name")
    ):
        load_experiment(path)


def test_fresh_deletes_only_an_experiments_own_output_dir(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    config = _quick_experiment(tmp_path, output_dir=str(user))
    for fresh in (["--fresh"], []):
        message = tf.refused(["experiment", config, *fresh], capsys)
        assert "not empty and it was not created by lora-jax experiment" in message
        assert ("--fresh deletes only" in message) == bool(fresh)
        assert [p.name for p in user.iterdir()] == ["thesis.tex"]  # nothing deleted or added
    run = rundir.claim(tmp_path / "run", "run")
    (run / "adapter").mkdir()
    message = tf.refused(
        ["experiment", _quick_experiment(tmp_path, output_dir=str(run)), "--fresh"], capsys
    )
    assert "is a lora-jax 'run' directory" in message and (run / "adapter").is_dir()

    # the experiment's own directory: a bad config is found before --fresh deletes anything
    own = rundir.claim(tmp_path / "own", "experiment")
    (own / "results.json").write_text("{}")
    config = _quick_experiment(tmp_path, output_dir=str(own), data=str(tmp_path / "none.csv"))
    assert main(["experiment", config, "--fresh"]) == 2
    assert "none.csv does not exist" in capsys.readouterr().err
    assert (own / "results.json").is_file()
    # --fresh with --methods would delete the left-out methods' runs too: refused first
    config = _quick_experiment(tmp_path, output_dir=str(own))
    message = tf.refused(["experiment", config, "--fresh", "--methods", "zero-shot"], capsys)
    assert "drop --methods" in message and (own / "results.json").is_file()
    cfg = load_experiment(_quick_experiment(tmp_path, output_dir=str(own)))
    check_outputs(cfg, fresh=True)
    fresh_start(cfg)
    assert not own.exists()


def test_the_report_and_plot_replace_only_a_report_and_plot(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    cfg = load_experiment(_quick_experiment(tmp_path, report=str(tmp_path / "README.md")))
    (tmp_path / "README.md").write_text("# My project\n")
    with pytest.raises(ConfigError, match=r"report .*README.md exists and is not a report"):
        check_outputs(cfg)
    assert (tmp_path / "README.md").read_text() == "# My project\n"
    cfg = load_experiment(_quick_experiment(tmp_path))
    (docs / "results.md").write_text(experiment_lib.REPORT_MARK + "an old table\n\n|...|\n")
    (docs / "results.png").write_bytes(b"\x89PNG\r\n\x1a\n my own drawing")
    with pytest.raises(ConfigError, match=r"plot .*results.png exists and is not a plot"):
        check_outputs(cfg)
    experiment_lib.plot([{"method": "zero-shot", "scores": {"BLEU": 0.5}}], docs / "results.png")
    check_outputs(cfg)  # an earlier report and plot: replaced
