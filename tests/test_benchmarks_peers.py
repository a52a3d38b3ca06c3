"""benchmarks.peers' arithmetic on synthetic rounds (the workers themselves are not run: they
are timed measurements, not behaviour)."""

import pytest

from benchmarks import peers


def _worker(step_s, probes, flops=None):
    return {
        "step_s": step_s,
        "probes": probes,
        "trainable_params": 1,
        "peak_rss_bytes": 2**30,
        **({"model_flops": flops} if flops else {}),
    }


def _round(torch_peft_s, probes=(100.0, 95.0)):
    return {
        "jax-lora": _worker(12.0, list(probes), flops=1.2e12),
        "jax-full": _worker(20.0, list(probes), flops=1.8e12),
        "torch-peft": _worker(torch_peft_s, list(probes)),
        "torch-full": _worker(24.0, list(probes)),
    }


def test_model_flops_rates_and_the_lowest_reachable_ratio():
    rounds = [_round(15.0), _round(16.0)]
    rows = {r["worker"]: r for r in peers.summarise(rounds)}
    # jax-lora: 1.2e12 FLOPs in 12 s = 100 GFLOP/s; the probes' median is 97.5
    assert rows["jax-lora"]["gflops"] == pytest.approx(100.0)
    assert rows["jax-lora"]["of_probe"] == pytest.approx(100.0 / 97.5)
    # torch workers are credited with the FLOPs of the same method's JAX worker
    assert rows["torch-peft"]["model_flops"] == 1.2e12
    assert rows["torch-full"]["gflops"] == pytest.approx(1.8e12 / 24.0 / 1e9)
    assert rows["jax-lora"]["vs_torch_peft"] == pytest.approx((12 / 15 + 12 / 16) / 2)
    # at the fastest probe (100 GFLOP/s) lora-jax's 1.2e12 FLOPs take 12 s: 12/15, 12/16
    assert peers.ratio_bound(rounds) == pytest.approx((12 / 15 + 12 / 16) / 2)


def test_rounds_in_another_regime_give_no_ratio_or_bound():
    rounds = [_round(15.0, probes=(100.0, 40.0))]  # the probes disagree by more than 25%
    assert peers.ratio_bound(rounds) is None
    rows = {r["worker"]: r for r in peers.summarise(rounds)}
    assert rows["jax-lora"]["vs_torch_peft"] is None and rows["jax-lora"]["gflops"] is None
