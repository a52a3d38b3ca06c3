"""Small Flax Linen models that the LoRA tests adapt, one per kind of layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """A user-defined two-layer MLP of nn.Dense (kernels (D_in, H) and (H, D_out))."""

    hidden: int = 40
    features: int = 24

    @nn.compact
    def __call__(self, x_BxD):
        h_BxH = nn.gelu(nn.Dense(self.hidden, name="fc1")(x_BxD))
        return nn.Dense(self.features, name="fc2")(h_BxH)


class Attention(nn.Module):
    """Multi-head self-attention with nn.DenseGeneral kernels (D, N, Hd) and (N, Hd, D)."""

    heads: int = 4
    head_dim: int = 6

    @nn.compact
    def __call__(self, x_BxLxD):
        d = x_BxLxD.shape[-1]
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)(x_BxLxD)
        q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = proj("q_proj"), proj("k_proj"), proj("v_proj")
        logits_BxNxLxL = jnp.einsum("blnh,bmnh->bnlm", q_BxLxNxH, k_BxLxNxH) / self.head_dim**0.5
        causal_LxL = jnp.tril(jnp.ones(logits_BxNxLxL.shape[-2:], bool))
        weights = jax.nn.softmax(jnp.where(causal_LxL, logits_BxNxLxL, -1e9), axis=-1)
        out_BxLxNxH = jnp.einsum("bnlm,bmnh->blnh", weights, v_BxLxNxH)
        return nn.DenseGeneral(d, axis=(-2, -1), name="o_proj")(out_BxLxNxH)


class Block(nn.Module):
    """A pre-norm Transformer block of nn.Dense layers (what nn.scan repeats)."""

    heads: int = 4
    mlp: int = 40

    @nn.compact
    def __call__(self, x_BxLxD, _):
        b, l, d = x_BxLxD.shape
        h = nn.LayerNorm(name="norm1")(x_BxLxD)
        split = lambda t: t.reshape(b, l, self.heads, d // self.heads)
        q, k, v = (split(nn.Dense(d, name=n)(h)) for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("blnh,bmnh->bnlm", q, k) / (d // self.heads) ** 0.5
        causal = jnp.tril(jnp.ones((l, l), bool))
        attn = jnp.einsum("bnlm,bmnh->blnh", jax.nn.softmax(jnp.where(causal, logits, -1e9)), v)
        x_BxLxD = x_BxLxD + nn.Dense(d, name="o_proj")(attn.reshape(b, l, d))
        h = nn.LayerNorm(name="norm2")(x_BxLxD)
        h = nn.Dense(d, name="down_proj")(nn.gelu(nn.Dense(self.mlp, name="up_proj")(h)))
        return x_BxLxD + h, None


class ScannedLM(nn.Module):
    """Embedding, `layers` Blocks under nn.scan(nn.remat(...)), tied LM head (Embed.attend)."""

    vocab: int = 56
    dim: int = 24
    layers: int = 3

    @nn.compact
    def __call__(self, ids_BxL):
        embed = nn.Embed(self.vocab, self.dim, name="embed_tokens")
        x_BxLxD = embed(ids_BxL)
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.layers,
        )
        x_BxLxD, _ = stack(name="layers")(x_BxLxD, None)
        return embed.attend(nn.LayerNorm(name="norm")(x_BxLxD))


class EinsumNet(nn.Module):
    """nn.Einsum layers, one of them with a per-head batch axis in its kernel."""

    @nn.compact
    def __call__(self, x_BxLxD):
        h_BxLxF = nn.Einsum((24, 40), "bld,df->blf", name="up")(x_BxLxD)
        h_BxNxLxG = h_BxLxF.reshape(*h_BxLxF.shape[:2], 4, 10).transpose(0, 2, 1, 3)
        y_BxNxLxE = nn.Einsum((4, 10, 6), "bnlg,nge->bnle", name="per_head")(h_BxNxLxG)
        return y_BxNxLxE.transpose(0, 2, 1, 3).reshape(*x_BxLxD.shape[:2], 24)


def perturb_factors(params, key, scale=0.3):
    """Replaces every A and B with random values, so equivalence tests can fail."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        trained = any(
            s in jax.tree_util.keystr(path) for s in ("_lora_a", "_lora_b", "_lora_delta")
        )
        out.append(scale * jax.random.normal(k, x.shape, x.dtype) if trained else x)
    return jax.tree_util.tree_unflatten(treedef, out)


_VARIABLES: dict = {}


def init_variables(model, x, seed=0):
    """`model.init(key(seed), x)`, jitted and memoised: tests reuse the same base models."""
    key = (repr(model), x.shape, str(x.dtype), seed)
    if key not in _VARIABLES:
        _VARIABLES[key] = jax.jit(model.init)(jax.random.key(seed), x)
    return _VARIABLES[key]
