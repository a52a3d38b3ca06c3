"""The library on a core-only install (``pip install lora-jax``: jax, flax, optax, numpy).

Run by the Makefile's ``check-core`` with the python of a venv that has only the core
install: ``lora_jax`` must import and do its job (init, a factored forward equal to the
merged one, a training step on the factors only), and none of the pipeline's packages may
have come with it.
"""

import importlib.util
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

# the [train], [e2e] and [test] extras' packages, and benchmarks/, which is never shipped
PIPELINE_ONLY = [
    "datasets",
    "omegaconf",
    "tokenizers",
    "gguf",
    "safetensors",
    "tensorboardX",
    "matplotlib",
    "torch",
    "transformers",
    "sacrebleu",
    "nltk",
    "benchmarks",
]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="fc2")(jax.nn.gelu(nn.Dense(16, name="fc1")(x)))


def main() -> None:
    present = [name for name in PIPELINE_ONLY if importlib.util.find_spec(name) is not None]
    assert not present, f"a core install brought pipeline packages: {present}"
    model, x = MLP(), jax.random.normal(jax.random.key(0), (4, 8))
    base = model.init(jax.random.key(1), x)["params"]
    config = lj.LoraConfig(rank=2, alpha=4.0, targets=r"fc\d/kernel")
    adapted = lj.init(jax.random.key(2), base, config)
    frozen, trainable = lj.split(adapted)
    tx = lj.optimizer(optax.adam(1e-2), trainable)

    def loss(t):
        return jnp.mean(lj.apply(model.apply)({"params": lj.combine(frozen, t)}, x) ** 2)

    grads = jax.grad(loss)(trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    trainable = optax.apply_updates(trainable, updates)
    params = lj.combine(frozen, trainable)
    factored = lj.apply(model.apply)({"params": params}, x)
    merged = model.apply({"params": lj.merge(params)}, x)
    assert not np.allclose(factored, model.apply({"params": base}, x))  # B moved off zero
    # float32, reductions of 8 and 16 terms of O(1) values: ~1e-6 apart at most
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    print(
        f"lora_jax works on a core install (python {sys.version.split()[0]}, "
        f"jax {jax.__version__}); none of {PIPELINE_ONLY} installed"
    )


if __name__ == "__main__":
    main()
