"""Checkpoint-format-independent half of loading: naming tensors by the family's table
(models/families.py), then checking the result against the model's parameter shapes and
building the (unboxed) params tree of global arrays (arrays.py) from lazy views (lazy.py)."""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

from models import families
from models.config import ModelConfig, with_options
from models.decoder import Decoder, abstract_variables
from models.loaders.arrays import default_sharding, global_array
from models.loaders.lazy import LazyTensor, stack, zeros


class ModelFileError(ValueError):
    """A model checkpoint that cannot be loaded: it does not fit the model its config
    describes (missing/unexpected tensors, wrong shapes) or the options asked of it.

    The message is one line: the checkpoint, what does not fit, and the fix.
    """


def _some(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more: keeps a message one line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def rename(
    tensors: Mapping[str, LazyTensor],
    config: ModelConfig,
    fmt: str,
    convert: Callable[[families.Place, LazyTensor], LazyTensor],
    prefix: str = "",
) -> tuple[dict[str, LazyTensor], list[str]]:
    """(our params {"a/b/kernel": array}, names of the tensors that no parameter has) of
    checkpoint `tensors` named in format `fmt` ("hf" or "gguf"): each parameter of the model
    finds its tensor by the family's table, and `convert(place, tensor)` gives its value (a
    view: nothing is read).
    Tensors `families.dropped` names are skipped; `prefix` is one that some checkpoints leave
    out of their tensor names."""
    wanted = collections.defaultdict(list)
    for name in expected_shapes(config):
        place = families.locate(config, name)
        if place is not None and getattr(place, fmt) is not None:
            wanted[place.tensor(fmt)].append((name, place))
    skip = families.dropped(config, fmt)
    named, unmatched = {}, []
    for key, array in tensors.items():
        found = next((k for k in (key, prefix + key) if k in wanted or k in skip), None)
        if found is None:
            unmatched.append(key)
        for name, place in wanted.get(found, ()):
            named[name] = convert(place, array)
    return named, unmatched


@functools.lru_cache(maxsize=8)
def expected_shapes(config: ModelConfig) -> Mapping[str, tuple[int, ...]]:
    """{"layers_0/self_attn/q_proj/kernel": shape, ...} of the unscanned model (read-only)."""
    abstract = abstract_variables(
        Decoder(with_options(config, scan_layers=False)), 1, 1, decode=False
    )
    flat = jax.tree_util.tree_flatten_with_path(
        abstract["params"], is_leaf=lambda x: hasattr(x, "names")
    )[0]
    return types.MappingProxyType(
        {"/".join(k.key for k in path): tuple(leaf.value.shape) for path, leaf in flat}
    )


def configure(
    checkpoint: ModelConfig, options: dict[str, Any], source: str
) -> tuple[ModelConfig, dict[str, LazyTensor]]:
    """(the checkpoint's own config with `options` applied, {name: zeros} of the biases they add).

    `attention_bias` / `mlp_bias` options may give a Llama checkpoint biases it lacks: the
    missing ones are zeros, so the model computes exactly the checkpoint's function. Options
    that would drop biases the checkpoint has raise ModelFileError.
    """
    config = with_options(checkpoint, **options)
    flags = ("attention_bias", "mlp_bias")
    for flag in flags:
        if getattr(checkpoint, flag) and not getattr(config, flag):
            raise ModelFileError(
                f"{source} has biases ({flag}=true) that the option "
                f"{flag}=False would drop; leave the option out (or set it "
                f"true)"
            )
    if all(getattr(config, flag) == getattr(checkpoint, flag) for flag in flags):
        return config, {}
    present = expected_shapes(with_options(config, **{f: getattr(checkpoint, f) for f in flags}))
    return config, {
        name: zeros(shape) for name, shape in expected_shapes(config).items() if name not in present
    }


def build_params(
    named: dict[str, Any],
    unmatched: list[str],
    config: ModelConfig,
    source: str,
    shardings: Mapping[str, Sharding] | None = None,
) -> dict[str, Any]:
    """Check `named` (our unscanned names -> `LazyTensor` views of checkpoint tensors, or
    arrays) against the model, then return the params tree of global `jax.Array`s in
    `config.param_dtype`, stacked along a leading layer axis under "layers" when
    `config.scan_layers`, each laid out by `shardings[name]` ({"a/b/kernel": Sharding}; None:
    all on this process's first device). Each process reads only the blocks of each tensor
    its devices hold (arrays.global_array), one parameter at a time. `named` is consumed.

    Raises ModelFileError listing missing and unexpected tensors, or naming a parameter whose
    shape differs, before any tensor is read.
    """
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(named))
    unexpected = sorted(unmatched + sorted(set(named) - set(expected)))
    if missing or unexpected:
        raise ModelFileError(
            f"{source} does not match the {config.family} model its config describes ("
            + "; ".join(
                ([f"{len(missing)} parameters missing: {_some(missing)}"] if missing else [])
                + (
                    [f"{len(unexpected)} unexpected tensors: {_some(unexpected)}"]
                    if unexpected
                    else []
                )
            )
            + "); the checkpoint is incomplete or of another architecture: download or save it "
            "again, or load the model it belongs to"
        )
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ModelFileError(
                f"{source}: parameter {name} has shape {tuple(named[name].shape)} in the checkpoint "
                f"but its config describes a model that needs {shape}; the weights and the config "
                f"do not belong together: download or save the checkpoint again"
            )
    tensors = _stacked(named, config)
    default = default_sharding()
    return _unflatten(
        {
            name: global_array(
                tensors.pop(name),
                default if shardings is None else shardings[name],
                config.param_dtype,
            )
            for name in list(tensors)
        }
    )


def _stacked(named: dict[str, Any], config: ModelConfig) -> dict[str, LazyTensor]:
    """`named` as views; with `config.scan_layers`, the "layers_{i}/rest" entries stacked into
    one "layers/rest" with a leading layer axis. Nothing is read; `named` is emptied."""
    views = {
        name: tensor if isinstance(tensor, LazyTensor) else LazyTensor.wrap(np.asarray(tensor))
        for name, tensor in named.items()
    }
    named.clear()
    if not config.scan_layers:
        return views
    out = {name: views.pop(name) for name in list(views) if not name.startswith("layers_")}
    for rest in sorted({k.split("/", 1)[1] for k in views if k.startswith("layers_0/")}):
        out[f"layers/{rest}"] = stack(
            [views.pop(f"layers_{i}/{rest}") for i in range(config.num_layers)]
        )
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
