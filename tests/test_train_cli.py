"""train/cli.py: ``lora-jax train`` end to end on a tiny model and a small E2E CSV."""

from __future__ import annotations

import json

import pytest

from train.cli import main
from train.config import config_to_yaml, load_config

import train_fixtures as tf

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        config_to_yaml(
            tf.tiny_config(
                tf.write_tiny_llama(tmp_path / "model"), tf.write_csv(tmp_path / "e2e.csv"), run_dir
            )
        )
    )
    overrides = [
        "optim.max_steps=4",
        "logging.tensorboard=true",
        "eval.every_steps=2",
        "eval.samples=2",
        "eval.max_new_tokens=8",
    ]
    assert main(["train", str(config), *overrides]) == 0
    out = capsys.readouterr().out
    assert "validation loss (nats/token): before" in out
    assert out.count("generated:") == 2 and out.count("reference:") == 2

    assert load_config(run_dir / "config.yaml") == load_config(config, overrides)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "validation"] == [0, 2, 4]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= records[1].keys()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((run_dir / "adapter" / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["model_options"]["dtype"] == "float32"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "4"]


def test_errors_name_the_problem_and_exit_with_status_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist; pass one of" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("lora:\n  rnak: 4\n")
    assert main(["train", str(config)]) == 2
    assert "did you mean 'lora.rank'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fly"])


def test_help_of_every_command_imports_no_jax():
    """``lora-jax --help`` and each ``COMMAND --help`` build the parser from the command
    tables alone (train/cli.py): in a fresh interpreter, nothing heavy gets imported."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom train.cli import commands, parser\n"
        "for argv in [['--help']] + [[name, '--help'] for name in commands()]:\n"
        "    try:\n        parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
        "heavy = sorted({'jax', 'flax', 'orbax', 'datasets', 'torch', 'models', 'lora_jax'}"
        " & {name.split('.')[0] for name in sys.modules})\n"
        "print('heavy:', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("heavy: []")


def test_train_prints_each_adapters_validation_when_several_train_together(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    model, csv = tf.write_tiny_llama(tmp_path / "model"), tf.write_csv(tmp_path / "e2e.csv")
    config.write_text(config_to_yaml(tf.tiny_config(model, csv, run_dir)))
    overrides = ["optim.max_steps=2", "lora.num_adapters=2", "optim.learning_rates=[1e-2,1e-3]"]
    assert main(["train", str(config), *overrides]) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if "(nats/token): before" in line
    ]
    # the printed losses are each adapter's logged validation records (4 decimals)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for j, (line, rate) in enumerate(zip(lines, ("0.01", "0.001"), strict=True)):
        before, after = (r["loss"] for r in records if r["split"] == f"validation/adapter_{j}")
        assert line.startswith(f"validation loss of adapter_{j} (lr {rate}) (nats/token): ")
        assert f"before {before:.4f}  after {after:.4f}" in line
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
