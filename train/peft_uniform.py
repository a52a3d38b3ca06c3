"""An adapter normalised for serving engines that take one r, one alpha and one scale per
adapter (vLLM's ``PEFTHelper``, TensorRT-LLM): every factor padded to the largest rank with
zeros, every scale folded into B, the scale itself 1 (alpha = r, no rsLoRA).

The update of each weight is unchanged: s·A·B = 1·[A 0]·[s·B; 0].
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

import lora_jax as lj

_A, _B, _SCALE = "_lora_a", "_lora_b", "_lora_scale"


def uniform(params: Any) -> tuple[Any, list[str]]:
    """(`params` with every adapter at the largest rank R and scale 1, what was changed).

    A (*stack, *in, r) gets R - r zero columns, B (*stack, r, *out) gets its rows times s
    and R - r zero rows; s becomes ones. The list says, in words, what differs from the
    input (empty if it was uniform already).
    """
    flat = lj.flatten_paths(params)
    weights = [k[: -len(_A)] for k in flat if k.endswith(_A)]
    ranks = {w: flat[w + _A].shape[-1] for w in weights}
    scales = {w: np.asarray(flat[w + _SCALE], np.float32) for w in weights}
    top = max(ranks.values())
    out = dict(flat)
    for w in weights:
        a, b, s = flat[w + _A], flat[w + _B], scales[w]
        pad = top - ranks[w]
        rank_axis = s.ndim  # B is (*stack, r, *out); s is (*stack,)
        s_b = jnp.reshape(s, s.shape + (1,) * (b.ndim - s.ndim)).astype(np.float32)
        b = (b.astype(np.float32) * s_b).astype(b.dtype)
        out[w + _A] = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        out[w + _B] = jnp.pad(b, [(0, pad) if i == rank_axis else (0, 0) for i in range(b.ndim)])
        out[w + _SCALE] = jnp.ones_like(flat[w + _SCALE])
    changes = []
    if len(set(ranks.values())) > 1:
        changes.append(
            f"ranks {sorted(set(ranks.values()))} padded with zeros to r={top} everywhere"
        )
    distinct = sorted({float(v) for s in scales.values() for v in np.ravel(s)})
    if distinct != [1.0]:
        shown = ", ".join(f"{v:.6g}" for v in distinct[:4]) + (", ..." if len(distinct) > 4 else "")
        changes.append(
            f"scales s ({shown}) folded into lora_B; lora_alpha = r = {top}, so every scale is 1 "
            "(use_rslora false)"
        )
    return lj.unflatten_paths(out), changes
