"""benchmarks.report on synthetic results: the tables' figures and the targets' verdicts appear
(the benchmarks themselves are not tested by timing)."""

import json

from benchmarks import report

MACHINE = {
    "cpu": "Test CPU",
    "cores": 2,
    "devices": ["cpu:0"],
    "device_count": 1,
    "python": "3.11.7",
    "versions": {"jax": "0.0.1"},
}


def _train_step(lora_vs_full):
    def row(method, vs_full):
        return {
            "method": method,
            "trainable_params": 10,
            "trainable_pct": 1.0,
            "step_s": 2 * vs_full,
            "step_vs_full": vs_full,
            "peak_bytes": 2**30,
            "peak_vs_full": 0.4,
            "opt_state_bytes": 2**20,
            "opt_state_vs_full": 250.0,
        }

    return {
        "benchmark": "train_step",
        "model": "m",
        "total_params": 1000,
        "batch": 8,
        "seq": 128,
        "dtype": "float32",
        "rank": 8,
        "targets": "q",
        "machine": MACHINE,
        "command": "python -m benchmarks.train_step",
        "probe_gflops": {"min": 150, "max": 160},
        "methods": [
            row("full", 1.0),
            row("lora_apply", lora_vs_full),
            row("lora_materialize", 0.7),
        ],
    }


def _latency(merged_forward):
    def row(variant, forward):
        return {
            "variant": variant,
            "extra_params": 0,
            "forward_ms": 50 * forward,
            "forward_spread_pct": 1.0,
            "forward_vs_base": forward,
            "forward_vs_base_range": "1.000-1.000",
            "generate_ms": 1500.0,
            "generate_spread_pct": 1.0,
            "generate_vs_base": 1.004,
            "generate_vs_base_range": "1.000-1.010",
        }

    return {
        "benchmark": "latency",
        "model": "m",
        "total_params": 1000,
        "seq": 128,
        "prompt": 32,
        "new_tokens": 32,
        "rank": 8,
        "lora_params": 460800,
        "bottleneck": 6,
        "adapter_params": 449640,
        "forward_reps": 20,
        "generate_reps": 4,
        "rounds": 5,
        "machine": MACHINE,
        "command": "python -m benchmarks.latency",
        "probe_gflops": {"min": 150, "max": 160},
        "valid_rounds": [0, 1, 2, 3, 4],
        "ratios_from_all_rounds": False,
        "merged_vs_unmerged_max_abs_logit_diff": 1e-6,
        "variants": [
            row("base", 1.0),
            row("merged", merged_forward),
            row("unmerged", 1.08),
            row("adapter", 1.234),
        ],
    }


def test_report_shows_the_tables_and_the_verdicts(tmp_path):
    (tmp_path / "train_step.json").write_text(json.dumps(_train_step(0.612)))
    (tmp_path / "latency.json").write_text(json.dumps(_latency(1.031)))
    out = tmp_path / "docs" / "benchmarks.md"
    text = report.write(tmp_path, out)

    assert out.read_text() == text
    assert "| lora_apply | 10 | 1.000 | 1.224 | 0.612 | 1,024 |" in text  # step s, vs full, MiB
    assert "| LoRA / full step time <= 0.65 on CPU | 0.612 | **met** |" in text
    assert "| adapter | 0 | 61.70 | 1.0 | 1.234 |" in text
    assert "forward 1.031, generate 1.004 | **not met** |" in text  # merged off by 3.1%
    assert "Test CPU, 2 cores" in text and "`python -m benchmarks.latency`" in text
    assert "Not run yet: `python -m benchmarks.peers`" in text  # no peers.json
    assert "GPU" not in text  # the GPU section appears only with its result
