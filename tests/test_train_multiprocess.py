"""Two processes on localhost (``jax.distributed``, gloo CPU collectives, 2 devices each)
run ``lora-jax train`` together and agree with a single-process, single-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from test_train_mesh import run_atol

from train.config import config_to_yaml
from train.run import train

import tolerances as tol
import train_fixtures as tf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_two_processes_match_one(tmp_path):
    config = tmp_path / "tiny.yaml"
    cfg = tf.tiny_config(
        tf.write_tiny_llama(tmp_path / "model"),
        tf.write_csv(tmp_path / "e2e.csv"),
        tmp_path / "one",
        "optim.max_steps=3",
    )
    config.write_text(config_to_yaml(cfg))
    single = train(cfg, log=lambda _: None)

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    address = f"127.0.0.1:{free_port()}"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train.cli",
                "train",
                str(config),
                "mesh.data=-1",
                f"output_dir={tmp_path / 'two'}",
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=tf.REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in outputs[0]

    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == [1, 2, 3]
    # The 4-device run reduces in another order than the 1-device run: float32 rounding only,
    # along the chain of the loss at step s, after s - 1 updates (test_train_mesh.run_atol).
    for step, loss in one.items():
        tol.assert_close(two[step], loss, run_atol(step - 1, loss), f"step {step}")
    after = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])
    assert after["split"] == "validation"
    expected = single.validation_after["loss"]
    tol.assert_close(after["loss"], expected, run_atol(3, expected), "validation")
    assert (tmp_path / "two" / "adapter" / "adapter.json").is_file()
