"""Tolerances for float comparisons in the tests: derived from the arithmetic, not tuned.

The rule
--------
A float format rounds each operation with a relative error of at most its unit roundoff
u = eps/2 (float32: 2**-24 ≈ 6.0e-8; bfloat16: 2**-8 ≈ 3.9e-3). A sum of K products added
in *any* order — whatever SIMD width, blocking or fusion XLA (or torch) picks on whatever
CPU — is within (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1)

    |fl(Σ a_i·b_i) − Σ a_i·b_i|  <=  γ_K · Σ |a_i|·|b_i|,        γ_n = n·u / (1 − n·u),

elementwise for a matmul (|fl(AB) − AB| <= γ_K·|A||B|), and errors along a computation add
up to first order: reductions of lengths K_1, K_2, ... plus m further roundings are within
γ_{K_1 + K_2 + ... + m} of the magnitudes they carry (Higham, Lemma 3.3). Two computations
of one quantity that round differently (factored vs merged, packed vs alone, 8 devices vs 1,
XLA vs torch) each lie within that bound of the exact value, so they may differ by twice it
(``sides=2``); a float64 reference is exact by comparison (``sides=1``). Every tolerance is
absolute (rtol = 0), and comes from one of:

* :func:`dot_error` — short, linear computations (a merge W + s·A·B, a layer by hand): the
  rigorous elementwise bound from the actual operands' magnitudes.
* :func:`chain_atol` — long non-linear chains (a model's logits, gradients through a
  network), whose elementwise magnitudes cannot be carried through exactly:
  ``sides · γ_n · scale``, with n the reduction lengths and roundings on the longest path
  (:func:`decoder_depth`, :func:`grad_depth`) and ``scale`` the largest magnitude of the
  compared quantity. This takes the magnitudes at the output's scale (norms and residual
  streams keep activations there) and is the first-order worst case in n, not a proof.

The worst case in n is ~√n times the typical error (independent roundings mostly cancel):
that is the margin that makes a comparison pass on any CPU. Measured on one x86 CPU, the
differences use 1/200 to 1/30 of the chain bounds (gradients through ScannedLM 1/50,
packed logits 1/40, ours against torch 1/170, 8 devices against 1 1/500) and up to 1/3 of
the rigorous elementwise ones. A real bug (a scale off by 1%, a token seen through a mask,
another layer's factors) moves results by 1e-2 relative or more, far beyond n·u while
n << 1e-2/u ≈ 1.7e5 in float32: the "planted bug" tests (test_apply, test_merge,
test_models_packing) check that each of those tolerances rejects one, by 400x to 10^6x.

Element-wise functions (exp, log, tanh, rsqrt, sin, ...) count :data:`ELEMENTWISE`
roundings each: XLA's and torch's vectorised versions are accurate to a few ulps, not
correctly rounded. In bfloat16, XLA's CPU dots accumulate in float32 (γ_K·u32, negligible);
what counts is one bfloat16 rounding per operation's output and per operand cast to it.

Exact results stay exact: counts, integer tokens, closed forms in Python floats, and
computations a float cannot round differently (x + 0, B = 0 adapters, resumed runs).
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

ELEMENTWISE = 4  # roundings charged to one element-wise function (a few ulps)


def unit_roundoff(dtype=np.float32) -> float:
    """u = eps/2 of ``dtype``: the largest relative error of one rounding."""
    return float(ml_dtypes.finfo(dtype).eps) / 2


def gamma(n: int, dtype=np.float32) -> float:
    """γ_n = n·u/(1 − n·u): the relative error bound of n roundings, in any order."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"γ_{n} is unbounded in {np.dtype(dtype).name} (n·u = {nu:.2f})")
    return nu / (1 - nu)


def dot_error(abs_terms, n: int, dtype=np.float32, sides: int = 1) -> np.ndarray:
    """``sides · γ_n · abs_terms``, elementwise: the bound for sums whose terms' magnitudes
    ``abs_terms`` (|A|@|B| for a matmul, plus |W| for W + ...) are known; n counts the
    reduction length plus the roundings after it."""
    return sides * gamma(n, dtype) * np.asarray(abs_terms, np.float64)


def chain_atol(n: int, scale: float, dtype=np.float32, sides: int = 2) -> float:
    """``sides · γ_n · scale``: the bound for a chain of n roundings on values of magnitude
    ``scale`` (see the module docstring)."""
    return sides * gamma(n, dtype) * float(scale)


def scale_of(*arrays) -> float:
    """The largest magnitude in ``arrays`` (the ``scale`` of :func:`chain_atol`)."""
    return max(float(np.max(np.abs(np.asarray(a, np.float64)))) for a in arrays)


def decoder_depth(
    *, layers: int, hidden: int, mlp: int, head_dim: int, keys: int, rank: int = 0
) -> int:
    """n for the logits of a pre-norm Transformer decoder.

    Per layer: two norms (mean and variance passes, 2·hidden each), the q/k/v projection
    (hidden), the scores (head_dim), the softmax normaliser and the weighted sum of values
    (keys each), the output projection (hidden), the MLP (hidden, then mlp), ``rank`` for a
    LoRA adapter beside each of the four projections on the path, and 16 element-wise
    functions (residual adds, rsqrt, RoPE, exp, activation) at :data:`ELEMENTWISE`; then
    the final norm (2·hidden) and the LM head (hidden).
    """
    per_layer = (
        2 * 2 * hidden
        + hidden
        + head_dim
        + 2 * keys
        + hidden
        + hidden
        + mlp
        + 4 * rank
        + 16 * ELEMENTWISE
    )
    return layers * per_layer + 2 * hidden + hidden


def config_depth(config, keys: int, rank: int = 0) -> int:
    """:func:`decoder_depth` of a ``models.ModelConfig``."""
    return decoder_depth(
        layers=config.num_layers,
        hidden=config.hidden_size,
        mlp=config.intermediate_size,
        head_dim=config.head_dim,
        keys=keys,
        rank=rank,
    )


def logits_atol(config, expected, keys: int, rank: int = 0) -> float:
    """:func:`chain_atol` for two float32 evaluations of a ``models.ModelConfig`` decoder's
    logits (``expected``: either of them) over ``keys`` keys."""
    return chain_atol(config_depth(config, keys, rank), scale_of(expected))


def grad_depth(forward: int, tokens: int) -> int:
    """n for a gradient: the forward chain, the backward pass through it (the same
    reductions, transposed), and the weight gradient's sum over ``tokens``."""
    return 2 * forward + tokens


def train_depth(forward: int, vocab: int, tokens: int, updates: int) -> int:
    """n for a training loss (or parameters) after ``updates`` optimizer updates: the
    forward chain and the log-softmax over ``vocab``, plus each update's gradient
    (:func:`grad_depth` over ``tokens``).

    This takes an update's error to be its gradient's, relative to the gradient's scale.
    Adam divides each element by its own running magnitude, so an element whose gradient
    cancels to within rounding of zero could move by up to the learning rate either way;
    the comparisons using this hold only while no element does (LoRA's B = 0 factors and
    unseen embedding rows get exactly zero on any device count, not nearly zero).
    """
    loss = forward + vocab
    return loss + updates * grad_depth(loss, tokens)


def excess(actual, expected, atol) -> tuple[int, float]:
    """(how many elements differ by more than ``atol``, the largest |difference| − atol)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {e.shape}")
    over = np.abs(a - e) - np.asarray(atol, np.float64)
    over = np.where(np.isnan(over), np.inf, over)  # a NaN on either side is never close
    return int(np.sum(over > 0)), float(np.max(over, initial=-np.inf))


def close(actual, expected, atol) -> bool:
    """Whether every element of ``actual`` is within ``atol`` (scalar or elementwise) of
    ``expected``."""
    return excess(actual, expected, atol)[0] == 0


def assert_close(actual, expected, atol, what: str = "") -> None:
    """Assert :func:`close`, naming how many elements are off and by how much."""
    count, worst = excess(actual, expected, atol)
    if count:
        size = np.asarray(expected).size
        bound = np.max(np.asarray(atol, np.float64))
        raise AssertionError(
            f"{what + ': ' if what else ''}{count} of {size} elements differ by more than the "
            f"derived bound (atol up to {bound:.3g}); the worst by {worst:.3g} past it"
        )


def tree_close(actual, expected, atol_of) -> bool:
    """:func:`close` for every leaf; ``atol_of(expected_leaf)`` gives each leaf's bound."""
    return all(
        close(a, e, atol_of(e))
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    )


def tree_assert_close(actual, expected, atol_of, what: str = "") -> None:
    """:func:`assert_close` leaf by leaf; ``atol_of(expected_leaf)`` gives each bound."""
    for (path, e), a in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual), strict=True
    ):
        assert_close(a, e, atol_of(e), f"{what}{jax.tree_util.keystr(path)}")


__all__ = [
    "ELEMENTWISE",
    "assert_close",
    "chain_atol",
    "close",
    "config_depth",
    "decoder_depth",
    "dot_error",
    "excess",
    "gamma",
    "grad_depth",
    "logits_atol",
    "scale_of",
    "train_depth",
    "tree_assert_close",
    "tree_close",
    "unit_roundoff",
]
