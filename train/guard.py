"""When a run has gone wrong: non-finite values, divergence, and a loss that never moved.

:class:`DivergenceGuard` sees every update's metrics (train/step.py) and names the first
sign that training has failed:

* **non-finite**: the loss or the gradient norm is NaN or infinite;
* **blow-up**: a trainable parameter's magnitude exceeds :data:`MAX_GROWTH` times what the
  trainable parameters started at (``max|θ_t| > MAX_GROWTH · max(1, max|θ_0|)``). A
  learning rate far too high saturates the model without any NaN: SmolLM2 LoRA factors
  at ``optim.learning_rate=1e6`` reach ~1e16 while the loss sits at ln V and the
  gradient norm falls to 0, so neither the loss nor the gradient can be trusted to show it;
* **loss spike**: the loss exceeds :data:`SPIKE_FACTOR` times the median of the last
  :data:`WINDOW` losses (once :data:`MIN_HISTORY` are known);
* **gradient explosion**: the gradient norm (before clipping) exceeds
  :data:`GRAD_FACTOR` times the median of the last :data:`WINDOW` norms.

The loop checks each update *before* it may be saved, so every checkpoint on disk passed
the guard: the newest one is the last taken before the divergence. Restoring a checkpoint
applies :func:`blow_up` too (one written by an older version may not have).

:func:`never_learned` tells a run stuck at ln V (the cross-entropy of a uniform
prediction over the vocabulary) with no gradient left to leave it: it trains nothing and
must not report success. A freshly initialised model also starts near ln V, but its
gradient is not zero, so it is not judged stuck.

>>> guard = DivergenceGuard(start_max_abs=0.5)
>>> [guard.check({"loss": 3.0 - 0.1 * i, "grad_norm": 2.0, "param_max_abs": 0.6})
...  for i in range(6)]
[None, None, None, None, None, None]
>>> guard.check({"loss": 40.0, "grad_norm": 2.0, "param_max_abs": 0.6})
'the loss jumped to 40 nats/token, over 3× its recent median 2.75'
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import numpy as np

MAX_GROWTH = 1e3  # trainable parameters may grow to this many times their start (or 1)
SPIKE_FACTOR = 3.0  # a loss this many times its recent median is a divergence
GRAD_FACTOR = 100.0  # a gradient norm this many times its recent median is an explosion
WINDOW = 20  # updates in the running medians
MIN_HISTORY = 5  # updates known before spikes are judged (the first ones move fast)
STUCK_LOSS_RTOL = 1e-3  # a loss within 0.1% of ln V ...
STUCK_GRAD_NORM = 1e-6  # ... with a gradient norm below this is stuck


def growth_bound(start_max_abs: float) -> float:
    """The largest sane max|θ|, given the trainable parameters' max|θ| at step 0."""
    return MAX_GROWTH * max(1.0, start_max_abs)


def blow_up(largest: float, start_max_abs: float) -> str | None:
    """Why trainable parameters whose max|θ| is ``largest`` cannot be a good state, or None.

    >>> blow_up(2.0, start_max_abs=1.0) is None
    True
    >>> blow_up(1e16, start_max_abs=1.0)
    'parameters reached max |θ| = 1e+16, over 1000× their start (max |θ| 1 at step 0)'
    >>> blow_up(float("nan"), start_max_abs=1.0)
    'parameters hold NaN or infinite values'
    """
    if not math.isfinite(largest):
        return "parameters hold NaN or infinite values"
    if largest > growth_bound(start_max_abs):
        return (
            f"parameters reached max |θ| = {largest:.3g}, over {MAX_GROWTH:g}× their start "
            f"(max |θ| {start_max_abs:.3g} at step 0)"
        )
    return None


class DivergenceGuard:
    """Judges each update's metrics (``loss``, ``grad_norm``, ``param_max_abs``)."""

    def __init__(self, start_max_abs: float):
        self.start_max_abs = start_max_abs
        self._losses: deque[float] = deque(maxlen=WINDOW)
        self._norms: deque[float] = deque(maxlen=WINDOW)

    def check(self, metrics: Mapping[str, float]) -> str | None:
        """The reason this update diverged, or None (then it joins the history)."""
        loss, norm = metrics["loss"], metrics["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return f"the loss is {loss} and the gradient norm {norm}"
        reason = blow_up(metrics["param_max_abs"], self.start_max_abs)
        if reason:
            return reason
        if len(self._losses) >= MIN_HISTORY:
            median = float(np.median(self._losses))
            if loss > SPIKE_FACTOR * median > 0:
                return (
                    f"the loss jumped to {loss:.3g} nats/token, over {SPIKE_FACTOR:g}× its "
                    f"recent median {median:.3g}"
                )
            median = float(np.median(self._norms))
            if norm > GRAD_FACTOR * median > 0:
                return (
                    f"the gradient norm jumped to {norm:.3g}, over {GRAD_FACTOR:g}× its "
                    f"recent median {median:.3g}"
                )
        self._losses.append(loss)
        self._norms.append(norm)
        return None


def never_learned(loss: float, grad_norm: float, vocab_size: int) -> bool:
    """Is a run that ends at ``loss`` (nats/token) with ``grad_norm`` stuck at ln V?

    >>> never_learned(math.log(512), 0.0, 512), never_learned(6.13, 3.5, 512)
    (True, False)
    """
    ln_v = math.log(vocab_size)
    return abs(loss - ln_v) <= STUCK_LOSS_RTOL * ln_v and grad_norm <= STUCK_GRAD_NORM
