"""train/guard.py: what counts as divergence, on sequences of update metrics."""

from __future__ import annotations

import math

import pytest

from train import guard

# A real run's first updates (the tiny Llama of train_fixtures at learning rate 1e-2):
# the loss falls unevenly and the gradient norm swings by 4x; none of it is divergence.
HEALTHY = [
    (6.074, 3.54),
    (6.121, 4.34),
    (6.033, 2.73),
    (5.680, 2.23),
    (5.632, 1.41),
    (5.695, 1.43),
    (5.684, 1.02),
    (5.575, 1.15),
    (5.501, 1.33),
    (5.599, 1.07),
]


def judged(updates, start_max_abs=0.76, param_max_abs=0.8):
    judge = guard.DivergenceGuard(start_max_abs)
    return [
        judge.check({"loss": loss, "grad_norm": norm, "param_max_abs": param_max_abs})
        for loss, norm in updates
    ]


def test_a_healthy_run_is_never_judged_diverged():
    assert judged(HEALTHY) == [None] * len(HEALTHY)


@pytest.mark.parametrize(
    "update, sign",
    [
        ((math.nan, 1.0), "the loss is nan"),
        ((5.5, math.inf), "the gradient norm inf"),
        ((3 * 5.682 + 0.1, 1.0), "the loss jumped"),  # just over SPIKE_FACTOR × median
        ((5.5, 100 * 1.42 + 1), "the gradient norm jumped"),  # just over GRAD_FACTOR × median
    ],
)
def test_each_sign_of_divergence_is_named(update, sign):
    verdicts = judged(HEALTHY + [update])
    assert verdicts[:-1] == [None] * len(HEALTHY)
    assert sign in verdicts[-1]


def test_just_under_each_threshold_is_not_divergence():
    # the medians of HEALTHY: loss 5.682, gradient norm 1.42
    assert judged(HEALTHY + [(3 * 5.682 - 0.1, 100 * 1.42 - 1)])[-1] is None


def test_spikes_are_not_judged_before_enough_history():
    early = HEALTHY[: guard.MIN_HISTORY - 1] + [(40.0, 400.0)]
    assert judged(early)[-1] is None


def test_parameters_that_grow_past_the_bound_are_a_blow_up():
    bound = guard.growth_bound(0.76)
    assert bound == guard.MAX_GROWTH  # max(1, 0.76) = 1
    assert judged(HEALTHY[:1], param_max_abs=bound)[-1] is None
    assert "parameters reached" in judged(HEALTHY[:1], param_max_abs=bound * 1.01)[-1]
    assert "NaN or infinite" in judged(HEALTHY[:1], param_max_abs=math.nan)[-1]
    # the bound scales with what the parameters started at (full fine-tuning of big weights)
    assert guard.blow_up(2e4, start_max_abs=30.0) is None
    assert guard.blow_up(4e4, start_max_abs=30.0) is not None


def test_stuck_at_ln_v_needs_both_the_loss_and_a_vanishing_gradient():
    ln_v = math.log(49152)
    assert guard.never_learned(ln_v, 0.0, 49152)
    assert guard.never_learned(ln_v * (1 + 0.9e-3), 1e-7, 49152)
    assert not guard.never_learned(ln_v * (1 - 1.1e-3), 0.0, 49152)  # it moved
    assert not guard.never_learned(ln_v, 0.5, 49152)  # a fresh model near ln V can still learn
