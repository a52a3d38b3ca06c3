"""The LoRA paper's §7 analysis of trained adapters (Hu et al. 2021, arXiv 2106.09685).

Two questions, each as pure functions over arrays and over adapted trees:

* **Subspace similarity** (§7.2, Figures 3–4): how much do the directions two adapters
  learned for one weight overlap? With U_i the top-i singular directions of the first
  adapter's A and U_j the top-j of the second's,

      φ(A1, A2, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j)  ∈ [0, 1]

  (1: one subspace contains the other; E φ = max(i, j)/n for independent uniformly
  random subspaces of Rⁿ). `subspace_similarity` gives the whole i × j grid.
* **ΔW against W** (§7.3, Table 7): with U, V the top-r singular directions of
  ΔW = s·A·B, how large is W in them, ‖UᵀWV‖_F, compared with W's own top-r directions
  and random ones, and the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F
  (`update_vs_weight`).

Layout. The paper writes h = W₀x + BAx with B ∈ R^{d×r}, A ∈ R^{r×k}, W₀ ∈ R^{d×k}
(d outputs, k inputs). This library computes x·A·B with A (fan_in, r), B (r, fan_out) and
W (fan_in, fan_out): every matrix is the paper's *transposed* (our A = paper Aᵀ, our
B = paper Bᵀ, our W = paper W₀ᵀ). So

* the paper's right-singular vectors of A (in R^k, the inputs) are the *left*-singular
  vectors of our A (`input_basis`), and the paper's left-singular vectors of B (in R^d,
  the outputs) are the *right*-singular vectors of our B (`output_basis`);
* the paper's ‖UᵀW₀V‖_F, with U (d × r) and V (k × r) ΔW's left/right singular vectors,
  is ‖LᵀWR‖_F here with L (fan_in × r) and R (fan_out × r) the left/right singular
  vectors of our ΔW (= their V and U): the same number, as a Frobenius norm is
  unchanged by transposition. Each side uses its own directions, so no transpose is
  needed anywhere but in naming.

Why A (and not ΔW) for the similarity: as in the paper. The input directions ΔW can act
on are the columns of our A (the row space of the paper's ΔW = BA lies in A's), whatever
B does with them; ΔW's own right-singular vectors would weight them by B. `output_basis`
gives the same comparison on the output side (B).

Stacked (``nn.scan``) weights are read as (S, fan_in, fan_out) with the factors
(S, fan_in, r), (S, r, fan_out), s (S,) (`lora_jax._layout.flatten_factors`); every
result has that leading axis S (1 for an unstacked weight). Everything is computed in
float64 NumPy on the host: these are one-off analyses of small r-dimensional subspaces,
where float32's rounding (~1e-7 relative) would blur the smallest overlaps, and NumPy's
SVD is exact enough and needs no compilation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lora_jax import _layout, _tree

RANDOM_DRAWS = 16  # random direction pairs averaged for `UpdateVsWeight.along_random`


def _f64(x: Any) -> np.ndarray:
    return np.asarray(_tree.value(x), np.float64)


def input_basis(a_SxIxR: Any) -> np.ndarray:
    """(S, fan_in, r): the left-singular vectors of our A (S, fan_in, r), by decreasing
    singular value; the paper's right-singular vectors of its A ∈ R^{r×k}."""
    u_SxIxR, _, _ = np.linalg.svd(_f64(a_SxIxR), full_matrices=False)
    return u_SxIxR


def output_basis(b_SxRxO: Any) -> np.ndarray:
    """(S, fan_out, r): the right-singular vectors of our B (S, r, fan_out), by decreasing
    singular value; the paper's left-singular vectors of its B ∈ R^{d×r}."""
    _, _, vt_SxRxO = np.linalg.svd(_f64(b_SxRxO), full_matrices=False)
    return np.swapaxes(vt_SxRxO, -1, -2)


def subspace_similarity(u_SxNxI: np.ndarray, v_SxNxJ: np.ndarray) -> np.ndarray:
    """(S, I, J): φ[s, i-1, j-1] = ‖U_iᵀ V_j‖²_F / min(i, j) for orthonormal bases U, V of
    R^N (columns ordered by importance, as `input_basis` gives them), with U_i the first i
    columns of U and V_j the first j of V; each entry in [0, 1]."""
    if u_SxNxI.shape[:-1] != v_SxNxJ.shape[:-1]:
        raise ValueError(
            f"the two bases live in different spaces: {u_SxNxI.shape[:-1]} vs "
            f"{v_SxNxJ.shape[:-1]} (stack, dimension); compare adapters of the same base model"
        )
    overlap_SxIxJ = np.einsum("sni,snj->sij", u_SxNxI, v_SxNxJ) ** 2
    captured_SxIxJ = overlap_SxIxJ.cumsum(axis=1).cumsum(axis=2)  # ‖U_iᵀV_j‖²_F
    i_I = np.arange(1, u_SxNxI.shape[-1] + 1)
    j_J = np.arange(1, v_SxNxJ.shape[-1] + 1)
    return captured_SxIxJ / np.minimum(i_I[:, None], j_J[None, :])


class UpdateVsWeight(NamedTuple):
    """§7.3's figures for one adapted weight; each field has shape (S,), one per stacked
    layer (Frobenius norms, in W's units)."""

    rank: int  # r: the number of directions, the adapter's rank
    delta_norm: np.ndarray  # ‖ΔW‖_F
    weight_norm: np.ndarray  # ‖W‖_F
    along_delta: np.ndarray  # ‖LᵀWR‖_F, L, R: ΔW's top-r left/right singular vectors
    along_weight: np.ndarray  # the same along W's own top-r directions
    along_random: np.ndarray  # the same along random orthonormal L, R (mean of draws)
    amplification: np.ndarray  # ‖ΔW‖_F / along_delta


def delta_svd(a_SxIxR: Any, b_SxRxO: Any, s_S: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L (S, fan_in, r), σ (S, r), R (S, fan_out, r)): the thin SVD ΔW = L·diag(σ)·Rᵀ of
    ΔW = s·A·B, from QR factors of A and Bᵀ (ΔW itself is never formed)."""
    q_a_SxIxR, r_a_SxRxR = np.linalg.qr(_f64(a_SxIxR))
    q_b_SxOxR, r_b_SxRxR = np.linalg.qr(np.swapaxes(_f64(b_SxRxO), -1, -2))
    core_SxRxR = _f64(s_S)[:, None, None] * r_a_SxRxR @ np.swapaxes(r_b_SxRxR, -1, -2)
    p_SxRxR, sigma_SxR, qt_SxRxR = np.linalg.svd(core_SxRxR)
    return q_a_SxIxR @ p_SxRxR, sigma_SxR, q_b_SxOxR @ np.swapaxes(qt_SxRxR, -1, -2)


def projected_norm(w_SxIxO: np.ndarray, l_SxIxR: np.ndarray, r_SxOxR: np.ndarray) -> np.ndarray:
    """(S,): ‖LᵀWR‖_F, how large W (S, fan_in, fan_out) is in the directions L, R (either
    may be one (fan, r) basis for every layer)."""
    projected_SxRxR = np.swapaxes(l_SxIxR, -1, -2) @ w_SxIxO @ r_SxOxR
    return np.sqrt(np.sum(projected_SxRxR**2, axis=(-2, -1)))


def random_directions(fan: int, rank: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, fan, rank): orthonormal bases of uniformly random rank-dimensional subspaces
    of R^fan (QR of Gaussian matrices; ‖LᵀWR‖_F depends only on the subspaces)."""
    q_DxFxR, _ = np.linalg.qr(rng.standard_normal((draws, fan, rank)))
    return q_DxFxR


def update_vs_weight(
    w_SxIxO: Any,
    a_SxIxR: Any,
    b_SxRxO: Any,
    s_S: Any,
    *,
    draws: int = RANDOM_DRAWS,
    seed: int = 0,
) -> UpdateVsWeight:
    """§7.3 for W (S, fan_in, fan_out) and its adapter A (S, fan_in, r), B (S, r, fan_out),
    s (S,): see `UpdateVsWeight`. The random directions are `draws` pairs from
    ``np.random.default_rng(seed)``, the same pairs for every stacked layer.

    W's own top-r directions give ‖LᵀWR‖_F = √(σ₁² + … + σ_r²) of W (the largest any
    rank-r projection can give); random ones give about r/√(fan_in·fan_out)·‖W‖_F.
    A ΔW that is zero (an untrained adapter, B = 0) has amplification 0.
    """
    w_SxIxO = _f64(w_SxIxO)
    l_SxIxR, sigma_SxR, r_SxOxR = delta_svd(a_SxIxR, b_SxRxO, s_S)
    _, fan_in, fan_out = w_SxIxO.shape
    rank = l_SxIxR.shape[-1]
    rng = np.random.default_rng(seed)
    l_DxIxR = random_directions(fan_in, rank, draws, rng)
    r_DxOxR = random_directions(fan_out, rank, draws, rng)
    random_DxS = np.stack(
        [projected_norm(w_SxIxO, l_IxR, r_OxR) for l_IxR, r_OxR in zip(l_DxIxR, r_DxOxR)]
    )  # one draw at a time: (S, r, fan_out) at most in memory
    w_sigma_SxK = np.linalg.svd(w_SxIxO, compute_uv=False)
    delta_norm = np.sqrt(np.sum(sigma_SxR**2, axis=-1))
    along_delta = projected_norm(w_SxIxO, l_SxIxR, r_SxOxR)
    return UpdateVsWeight(
        rank=rank,
        delta_norm=delta_norm,
        weight_norm=np.sqrt(np.sum(w_sigma_SxK**2, axis=-1)),
        along_delta=along_delta,
        along_weight=np.sqrt(np.sum(w_sigma_SxK[:, :rank] ** 2, axis=-1)),
        along_random=random_DxS.mean(axis=0),
        amplification=np.divide(
            delta_norm, along_delta, out=np.zeros_like(delta_norm), where=delta_norm > 0
        ),
    )


# ------------------------------------------------------------------------------ trees


class Factors(NamedTuple):
    """One adapted weight's adapter, flattened: A (S, fan_in, r), B (S, r, fan_out), s (S,)
    in float64, and its weight W as stored in the tree (*stack, *in, *out) with its
    fan_in and fan_out."""

    a: np.ndarray
    b: np.ndarray
    s: np.ndarray
    w: Any  # the tree's leaf; only its shape is read unless W itself is analysed
    fan_in: int
    fan_out: int

    def weight(self) -> np.ndarray:
        """W as (S, fan_in, fan_out), float64."""
        return _f64(self.w).reshape(-1, self.fan_in, self.fan_out)


def adapted_factors(params: Any) -> dict[str, Factors]:
    """{path string: `Factors`} for every adapted weight of an adapted tree (``lj.init``'s,
    a trained one, an adapter directory loaded onto its base), in tree order. A weight
    leaf needs only a ``.shape`` (e.g. ``jax.ShapeDtypeStruct``) unless W is analysed."""
    flat = _tree.flatten(params)
    out = {}
    for path in _tree.adapted_weights(flat):
        name = _tree.path_str(path)
        a, b, s = (
            _f64(flat[_tree.lora_path(path, x)])
            for x in (_tree.A_SUFFIX, _tree.B_SUFFIX, _tree.SCALE_SUFFIX)
        )
        w = _tree.value(flat[path])
        lay = _layout.check_fits(name, w.shape, a.shape, b.shape, s.shape)
        fan_in, fan_out = _layout.fans(w.shape, lay)
        rank = a.shape[-1]
        out[name] = Factors(
            a.reshape(-1, fan_in, rank),
            b.reshape(-1, rank, fan_out),
            s.reshape(-1),
            w,
            fan_in,
            fan_out,
        )
    if not out:
        raise ValueError(
            "the tree holds no LoRA factors (no *_lora_a leaves); pass adapted params "
            "(lj.init's, or a trained adapter loaded onto its base)"
        )
    return out


def updates_vs_weights(
    params: Any, *, draws: int = RANDOM_DRAWS, seed: int = 0
) -> dict[str, UpdateVsWeight]:
    """{path string: `update_vs_weight`} for every adapted weight of an adapted tree."""
    return {
        name: update_vs_weight(f.weight(), f.a, f.b, f.s, draws=draws, seed=seed)
        for name, f in adapted_factors(params).items()
    }


def subspace_similarities(first: Any, second: Any, *, side: str = "input") -> dict[str, np.ndarray]:
    """{path string: φ grid (S, r₁, r₂)} for every weight both adapted trees adapt.

    ``side="input"``: the paper's comparison, of the A factors (`input_basis`);
    ``"output"``: of the B factors (`output_basis`). Raises a ValueError if the trees
    adapt no weight in common.
    """
    basis = {"input": lambda f: input_basis(f.a), "output": lambda f: output_basis(f.b)}
    if side not in basis:
        raise ValueError(f"side={side!r}: expected 'input' (A) or 'output' (B)")
    one, two = adapted_factors(first), adapted_factors(second)
    shared = [name for name in one if name in two]
    if not shared:
        raise ValueError(
            f"the two adapters adapt no weight in common ({sorted(one)[:3]} ... vs "
            f"{sorted(two)[:3]} ...); compare adapters with the same targets"
        )
    return {
        name: subspace_similarity(basis[side](one[name]), basis[side](two[name])) for name in shared
    }
