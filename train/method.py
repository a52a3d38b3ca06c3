"""What trains: ``method: lora | full | bitfit`` as a boolean mask over the parameter tree.

* ``lora``: ``lj.init`` adds the factors A, B (and bias deltas for ``lora.bias``) beside
  the target weights; the mask is ``lj.trainable_mask`` (A, B, deltas).
* ``full``: every parameter.
* ``bitfit`` (Ben Zaken et al. 2021): every leaf named ``bias``, the base's own biases
  trained in place. Not ``lj.init(bias="all")``: that adds bias *deltas* beside LoRA
  factors and needs targets, while BitFit has no factors at all. Llama-family models
  have no biases: load them with ``model.add_biases=true`` (zero biases on every attention
  and MLP projection, Hugging Face's ``attention_bias``/``mlp_bias``), else BitFit is refused.

The train step differentiates only the trainable half of :func:`partition` (the
optimizer sees nothing else, so frozen weights get no gradient, no update and no
optimizer state) and rebuilds the full tree with ``lj.combine``, which also checks
that every LoRA factor fits its weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import traverse_util

import lora_jax as lj
from train.config import ConfigError, LoraSection


def lora_config(section: LoraSection) -> lj.LoraConfig:
    """The ``lj.LoraConfig`` of a config's ``lora`` section."""
    return lj.LoraConfig(**dataclasses.asdict(section))


def prepare(method: str, params: Any, lora: LoraSection, key: jax.Array) -> tuple[Any, Any]:
    """(params to train from, trainable mask): adapted params for LoRA, else ``params``.

    The mask is a tree of bools shaped like the returned params.
    """
    if method == "lora":
        adapted = lj.init(key, params, lora_config(lora))
        return adapted, lj.trainable_mask(adapted)
    if method == "full":
        return params, jax.tree.map(lambda _: True, params)
    if method == "bitfit":
        mask = traverse_util.path_aware_map(lambda path, _: path[-1] == "bias", params)
        if not any(jax.tree.leaves(mask)):
            raise ConfigError("method=bitfit trains the model's biases, but this model has none "
                              "(Llama-family models have no biases); set model.add_biases=true "
                              "to give every attention and MLP projection a zero-initialised "
                              "bias to train (the loaded model computes the same function)")
        return params, mask
    raise ConfigError(f"unknown method {method!r}; use lora, full or bitfit")


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """(frozen, trainable): the leaves of ``params`` where ``mask`` is False / True."""
    flat = traverse_util.flatten_dict(params)
    flat_mask = traverse_util.flatten_dict(mask)
    frozen = {p: v for p, v in flat.items() if not flat_mask[p]}
    trainable = {p: v for p, v in flat.items() if flat_mask[p]}
    return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trainable)



def forward(method: str, apply_fn: Callable[..., Any], dropout: float) -> Callable[..., Any]:
    """``apply_fn`` (``model.apply``) as the method runs it: LoRA's factored forward, with
    LoRA dropout drawn from the ``'dropout'`` rng stream, or unchanged."""
    return lj.apply(apply_fn, dropout=dropout) if method == "lora" else apply_fn
