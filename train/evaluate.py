"""Validation: loss and perplexity over the validation split (or its first batches)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from jax.sharding import Mesh

from train.batching import Batch
from train.mesh import put_batch


def evaluate(
    step: Callable[..., Any], trainable: Any, frozen: Any, batches: Iterable[Batch], mesh: Mesh
) -> dict[str, float]:
    """``{"loss": nats per target token, "perplexity": exp(loss), "target_tokens": n}``.

    ``step`` is the jitted ``train.step.eval_step``; ``batches`` are this process's
    shares of each global validation batch. Sums are taken over every target token of
    every batch, so batches with more targets weigh more.
    """
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, n_targets = step(trainable, frozen, put_batch(batch, mesh))
        total += float(np.asarray(loss_sum))
        count += float(np.asarray(n_targets))
    if count == 0:
        raise ValueError(
            "the validation batches hold no target token; set data.validation_fraction > 0"
        )
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "target_tokens": count}
