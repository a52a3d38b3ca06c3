"""lora_jax.analysis: the paper's §7 subspace similarity and ΔW-against-W figures, checked
against the paper's own definitions (its transposed layout), closed-form expectations of
random subspaces, and ΔW built from chosen singular directions of a chosen W."""

from __future__ import annotations

import math

import numpy as np

from lora_jax import analysis

import tolerances as tol

U64 = tol.unit_roundoff(np.float64)


def orthonormal_gram_atol(n: int, r: int) -> float:
    """Bound on |φ − exact| for bases of R^n with r columns from LAPACK in float64.

    Householder-based factorisations (QR, SVD) give factors orthonormal to within γ̃_{n·r}
    (Higham Thm 19.4; γ̃ hides a small constant, counted here as a factor 4), then φ adds
    one inner product of length n and cumulative sums of up to r² squares: n = 4·n·r + n + r²
    roundings on quantities of magnitude 1 (φ ≤ 1).
    """
    return tol.chain_atol(4 * n * r + n + r * r, 1.0, np.float64, sides=1)


def hoeffding_margin(draws: int, cells: int, failure: float = 1e-9) -> float:
    """t with P(some cell's mean of `draws` independent [0, 1] values is t or more from its
    expectation) <= failure: Hoeffding, 2·exp(−2·draws·t²) per cell, union over `cells`."""
    return math.sqrt(math.log(2 * cells / failure) / (2 * draws))


# ------------------------------------------------------------ subspace similarity


def test_the_input_basis_is_the_papers_right_singular_vectors_of_its_A():
    """Our A (fan_in, r) is the paper's A (r, k) transposed: its right-singular vectors span
    the same space as `input_basis`, and ΔW = s·A·B ignores every input orthogonal to it;
    `output_basis` is the span of the paper's B (d, r) left-singular vectors, where every
    output of ΔW lies."""
    rng = np.random.default_rng(0)
    a_IxR, b_RxO = rng.standard_normal((10, 3)), rng.standard_normal((3, 7))
    u_IxR = analysis.input_basis(a_IxR[None])[0]
    paper_a_RxI = a_IxR.T
    v_IxR = np.linalg.svd(paper_a_RxI, full_matrices=False)[2].T
    # projectors onto the two spans; |error| <= γ of the factorisations and a length-r sum
    atol = tol.chain_atol(4 * 10 * 3 + 3, 1.0, np.float64, sides=2)
    tol.assert_close(u_IxR @ u_IxR.T, v_IxR @ v_IxR.T, atol, "input span")
    v_OxR = analysis.output_basis(b_RxO[None])[0]
    paper_b_OxR = b_RxO.T
    w_OxR = np.linalg.svd(paper_b_OxR, full_matrices=False)[0]
    tol.assert_close(v_OxR @ v_OxR.T, w_OxR @ w_OxR.T, atol, "output span")

    delta_IxO = 2.0 * a_IxR @ b_RxO
    x_I = rng.standard_normal(10)
    orthogonal_I = x_I - u_IxR @ (u_IxR.T @ x_I)
    # |x|·|ΔW| terms, a length-10 reduction after the length-3 projection
    bound = tol.dot_error(np.abs(x_I) @ np.abs(delta_IxO), 10 + 3 + 4 * 10 * 3 + 2)
    tol.assert_close(orthogonal_I @ delta_IxO, np.zeros(7), bound, "x ⟂ span(A) through ΔW")


def test_an_adapter_is_fully_similar_to_itself_and_to_any_mixing_of_its_columns():
    rng = np.random.default_rng(1)
    n, r = 16, 6
    a_SxNxR = rng.standard_normal((3, n, r))  # three stacked layers
    u = analysis.input_basis(a_SxNxR)
    atol = orthonormal_gram_atol(n, r)
    # φ(A, A, i, j) = min(i, j)/min(i, j) = 1: the smaller top subspace is inside the larger
    tol.assert_close(analysis.subspace_similarity(u, u), np.ones((3, r, r)), atol, "φ(A, A)")
    # A·G spans the same r-dimensional space for any invertible G, so φ(·, ·, r, r) = 1;
    # a basis of the orthogonal complement overlaps nothing, so φ = 0 everywhere
    mixed = analysis.input_basis(a_SxNxR @ rng.standard_normal((r, r)))
    tol.assert_close(analysis.subspace_similarity(u, mixed)[:, -1, -1], np.ones(3), atol)
    complement = np.linalg.svd(a_SxNxR, full_matrices=True)[0][:, :, r:]
    tol.assert_close(
        analysis.subspace_similarity(u, complement), np.zeros((3, r, n - r)), atol, "⟂"
    )


def test_independent_random_subspaces_have_the_closed_form_expected_similarity():
    """For uniformly random U_i, U_j in R^n, E‖U_iᵀU_j‖²_F = i·j/n, so E φ = max(i, j)/n.
    The top-i subspace of a Gaussian matrix is uniform (its law is rotation-invariant), so
    the draws are the stacked layers of two Gaussian A's."""
    rng = np.random.default_rng(2)
    draws, n, r1, r2 = 20_000, 8, 4, 3
    phi_DxIxJ = analysis.subspace_similarity(
        analysis.input_basis(rng.standard_normal((draws, n, r1))),
        analysis.input_basis(rng.standard_normal((draws, n, r2))),
    )
    i_I, j_J = np.arange(1, r1 + 1)[:, None], np.arange(1, r2 + 1)[None, :]
    expected = np.maximum(i_I, j_J) / n
    margin = hoeffding_margin(draws, r1 * r2)  # φ ∈ [0, 1]; 0.025 here
    tol.assert_close(phi_DxIxJ.mean(axis=0), expected, margin, "mean φ")
    # the margin tells apart a normalisation by max(i, j) (E = min(i, j)/n) off the diagonal
    assert not tol.close(phi_DxIxJ.mean(axis=0), np.minimum(i_I, j_J) / n, margin)


# ------------------------------------------------------------------- ΔW against W


def _constructed(rng, fan_in, fan_out, sigma, directions, strengths, scale):
    """W = P·diag(σ)·Qᵀ with random orthogonal P, Q, and A, B with ΔW = s·Σ_k c_k p_k q_kᵀ
    over W's singular directions k in `directions` (c_k = `strengths`)."""
    p_IxI = np.linalg.qr(rng.standard_normal((fan_in, fan_in)))[0]
    q_OxO = np.linalg.qr(rng.standard_normal((fan_out, fan_out)))[0]
    k = len(sigma)
    w_IxO = p_IxI[:, :k] @ np.diag(sigma) @ q_OxO[:, :k].T
    a_IxR = p_IxI[:, directions] * np.sqrt(strengths)
    b_RxO = (q_OxO[:, directions] * np.sqrt(strengths)).T
    return w_IxO, a_IxR, b_RxO, scale


def test_amplification_of_a_constructed_update_equals_its_closed_form():
    """ΔW along W's singular pairs k ∈ K (W = Σ σ_k p_k q_kᵀ, ΔW = s·Σ_K c_k p_k q_kᵀ):
    ‖LᵀWR‖_F = √Σ_K σ_k², ‖ΔW‖_F = s·√Σ_K c_k², W's own top-r give √(σ₁² + … + σ_r²),
    and the amplification is their ratio. Two stacked layers, each with its own K."""
    rng = np.random.default_rng(3)
    fan_in, fan_out, scale = 12, 10, 2.0
    sigma = np.array([10.0, 9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    layers = [([2, 5], [4.0, 0.5]), ([0, 6], [1.0, 3.0])]  # (directions, strengths)
    built = [_constructed(rng, fan_in, fan_out, sigma, d, c, scale) for d, c in layers]
    w, a, b = (np.stack([x[i] for x in built]) for i in range(3))
    result = analysis.update_vs_weight(w, a, b, np.full(2, scale))

    along = np.array([math.sqrt(sum(sigma[k] ** 2 for k in d)) for d, _ in layers])
    delta = np.array([scale * math.sqrt(sum(x**2 for x in c)) for _, c in layers])
    expected = {
        "delta_norm": delta,
        "weight_norm": np.full(2, math.sqrt(np.sum(sigma**2))),
        "along_delta": along,
        "along_weight": np.full(2, math.sqrt(10.0**2 + 9.0**2)),
        "amplification": delta / along,
    }
    # Every figure is a norm of products of LAPACK factors (QR, SVD: orthonormal to within
    # γ̃_{fan·r}, Higham Thm 19.4, constant counted as 4) with W and reductions of length
    # fan_in and fan_out: n roundings relative to the largest magnitude carried, σ₁·√r or
    # ‖ΔW‖; the amplification adds the relative errors of its numerator and denominator,
    # the latter's magnitude √Σσ² / along at most ~24 times as large.
    n = 4 * (fan_in * fan_out + (fan_in + fan_out) * 2) + fan_in + fan_out + tol.ELEMENTWISE
    for field, value in expected.items():
        magnitude = tol.scale_of(value, np.sum(sigma**2) ** 0.5, delta)
        if field == "amplification":
            magnitude = 2 * tol.scale_of(value) * math.sqrt(np.sum(sigma**2)) / along.min()
        atol = tol.chain_atol(n, magnitude, np.float64, sides=1)
        tol.assert_close(getattr(result, field), value, atol, field)
    assert result.rank == 2


def test_random_directions_capture_the_closed_form_share_of_w():
    """For uniform random r-subspaces L of R^I and R of R^O, E‖LᵀWR‖²_F = r²/(I·O)·‖W‖²_F
    (E[LLᵀ] = (r/I)·1); each draw is at most W's top-r energy σ₁² + … + σ_r²."""
    rng = np.random.default_rng(4)
    fan_in, fan_out, rank, draws = 9, 6, 2, 20_000
    w_1xIxO = rng.standard_normal((1, fan_in, fan_out))
    l_DxIxR = analysis.random_directions(fan_in, rank, draws, rng)
    r_DxOxR = analysis.random_directions(fan_out, rank, draws, rng)
    w_DxIxO = np.broadcast_to(w_1xIxO, (draws, fan_in, fan_out))
    squares_D = analysis.projected_norm(w_DxIxO, l_DxIxR, r_DxOxR) ** 2
    top_energy = np.sum(np.linalg.svd(w_1xIxO[0], compute_uv=False)[:rank] ** 2)
    expected = rank**2 / (fan_in * fan_out) * np.sum(w_1xIxO**2)
    margin = hoeffding_margin(draws, 1) * top_energy  # the draws, scaled to [0, 1]
    tol.assert_close(np.mean(squares_D), expected, margin, "mean ‖LᵀWR‖²")


def test_an_adapted_tree_gives_each_stacked_layer_of_a_multi_axis_weight():
    """A scanned DenseGeneral-like weight W (S, in, heads, head_dim) with A (S, in, r),
    B (S, r, heads, head_dim): the tree functions flatten it to (S, in, heads·head_dim) as
    lj's layout rule does, and give the closed forms of the layers built above."""
    rng = np.random.default_rng(5)
    sigma = np.array([6.0, 4.0, 3.0, 1.0])
    layers = [([1, 3], [2.0, 1.0]), ([0, 2], [1.0, 1.0]), ([2, 3], [3.0, 0.5])]
    built = [_constructed(rng, 8, 6, sigma, d, c, 0.5) for d, c in layers]
    w, a, b = (np.stack([x[i] for x in built]) for i in range(3))
    block = {
        "kernel": w.reshape(3, 8, 2, 3),
        "kernel_lora_a": a,
        "kernel_lora_b": b.reshape(3, 2, 2, 3),
        "kernel_lora_scale": np.full(3, 0.5),
    }
    tree = {"layers": {"attn": {"query": block}}}
    result = analysis.updates_vs_weights(tree)
    assert list(result) == ["layers/attn/query/kernel"]
    along = np.array([math.sqrt(sum(sigma[k] ** 2 for k in d)) for d, _ in layers])
    delta = np.array([0.5 * math.sqrt(sum(x**2 for x in c)) for _, c in layers])
    n = 4 * (8 * 6 + (8 + 6) * 2) + 8 + 6 + tol.ELEMENTWISE  # as in the test above
    magnitude = 2 * tol.scale_of(delta / along) * math.sqrt(np.sum(sigma**2)) / along.min()
    got = result["layers/attn/query/kernel"]
    atol = tol.chain_atol(n, magnitude, np.float64, sides=1)
    tol.assert_close(got.amplification, delta / along, atol, "amplification")
    # the same tree against itself, and the stacked grids' shape (S, r, r)
    phi = analysis.subspace_similarities(tree, tree)["layers/attn/query/kernel"]
    tol.assert_close(phi, np.ones((3, 2, 2)), orthonormal_gram_atol(8, 2))
