"""Walking parameter trees: flat views, rebuilding, and the LoRA naming scheme.

A parameter tree is any nest of mappings (``dict``, ``FrozenDict``,
``nnx.State``) whose leaves are arrays or ``nnx.Variable`` wrappers of arrays.
A *path* is the tuple of keys from the root to a leaf; its string form joins
them with ``/`` (``"layers_0/self_attn/q_proj/kernel"``).

The adapter lives beside the weight it adapts, as sibling leaves of the same
module, named after the weight (for a leaf ``kernel``)::

  kernel_lora_a      A, shape (*stack, *in_axes, r)      trainable
  kernel_lora_b      B, shape (*stack, r, *out_axes)     trainable
  kernel_lora_scale  s, shape (*stack,), float32         frozen
  kernel_lora_magnitude  DoRA's m, shape (*stack, *out)  trainable (``use_dora``)
  bias_lora_delta    a bias update, the bias's shape     trainable

so the tree describes itself: `lora_jax._layout.check_fits` reads the
number of stacked (``nn.scan``) and input axes off the shapes.

An adapter *bank* (`lora_jax._bank`: n adapters, per-example ids) names its leaves
likewise, with an adapter axis of size n after the stacked ones::

  kernel_bank_a      (*stack, n, *in_axes, R)   trainable
  kernel_bank_b      (*stack, n, R, *out_axes)  trainable
  kernel_bank_scale  (*stack, n), float32       frozen
  kernel_bank_rank   (*stack, n), int32         frozen

`flatten_paths` and `unflatten_paths` are the public flat view: ``{path string:
leaf}``, the strings that ``LoraConfig.targets`` matches and `summary` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
from flax.core import FrozenDict
from flax.linen import meta

Path = tuple[Any, ...]

A_SUFFIX = "_lora_a"
B_SUFFIX = "_lora_b"
SCALE_SUFFIX = "_lora_scale"
DELTA_SUFFIX = "_lora_delta"
MAGNITUDE_SUFFIX = "_lora_magnitude"
LORA_SUFFIXES = (A_SUFFIX, B_SUFFIX, SCALE_SUFFIX, DELTA_SUFFIX, MAGNITUDE_SUFFIX)
BANK_A = "_bank_a"
BANK_B = "_bank_b"
BANK_SCALE = "_bank_scale"
BANK_RANK = "_bank_rank"
BANK_SUFFIXES = (BANK_A, BANK_B, BANK_SCALE, BANK_RANK)
TRAINABLE_SUFFIXES = (A_SUFFIX, B_SUFFIX, DELTA_SUFFIX, MAGNITUDE_SUFFIX, BANK_A, BANK_B)
LORAPLUS_B_SUFFIXES = (B_SUFFIX, DELTA_SUFFIX, MAGNITUDE_SUFFIX, BANK_B)


def path_str(path: Path) -> str:
    return "/".join(str(k) for k in path)


def leaf_name(path: Path) -> str:
    return str(path[-1])


def is_lora_leaf(path: Path) -> bool:
    return leaf_name(path).endswith(LORA_SUFFIXES)


def is_bank_leaf(path: Path) -> bool:
    return leaf_name(path).endswith(BANK_SUFFIXES)


def is_adapter_leaf(path: Path) -> bool:
    """A leaf of an adapter or of a bank of adapters: not the base's."""
    return is_lora_leaf(path) or is_bank_leaf(path)


def is_trainable_leaf(path: Path) -> bool:
    return leaf_name(path).endswith(TRAINABLE_SUFFIXES)


def is_loraplus_b_leaf(path: Path) -> bool:
    """Whether LoRA+ gives the leaf B's learning rate: B itself and, as PEFT groups them,
    the one-axis trainables (DoRA magnitudes, bias deltas)."""
    return leaf_name(path).endswith(LORAPLUS_B_SUFFIXES)


def sibling(path: Path, name: str) -> Path:
    return path[:-1] + (name,)


def lora_path(path: Path, suffix: str) -> Path:
    """The path of a LoRA leaf of the weight at `path`: (``kernel``, ``_lora_a``) →
    ``kernel_lora_a``; the inverse of `base_of`."""
    return sibling(path, leaf_name(path) + suffix)


def base_of(path: Path) -> Path:
    """The path of the weight a LoRA or bank leaf belongs to (``kernel_lora_a``,
    ``kernel_bank_a`` → ``kernel``)."""
    name = leaf_name(path)
    for suffix in LORA_SUFFIXES + BANK_SUFFIXES:
        if name.endswith(suffix):
            return sibling(path, name[: -len(suffix)])
    raise ValueError(f"{path_str(path)} is not a LoRA or bank leaf")


def flatten(tree: Any) -> dict[Path, Any]:
    """{path: leaf} in the tree's own key order. Leaves keep their wrappers."""
    flat: dict[Path, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, prefix + (key,))
        elif isinstance(node, meta.AxisMetadata):
            raise TypeError(
                f"the parameter at {path_str(prefix)!r} is boxed in {type(node).__name__}: "
                "unbox the tree first (flax.linen.meta.unbox(params)) and give its "
                "partition specs to lj.partition_specs"
            )
        else:
            flat[prefix] = node

    walk(tree, ())
    return flat


def unflatten_like(template: Any, flat: Mapping[Path, Any]) -> Any:
    """Builds a tree from {path: leaf}, using `template`'s container types.

    Containers that `template` has keep their type (dict, FrozenDict,
    nnx.State); new containers are dicts, or States inside a State.
    """
    nested: dict = {}
    for path, leaf in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf

    def build(node, like):
        items = {}
        for key, child in node.items():
            if isinstance(child, dict):
                sub = like.get(key) if isinstance(like, Mapping) else None
                items[key] = build(child, sub if isinstance(sub, Mapping) else like)
            else:
                items[key] = child
        return _container_like(like, items)

    return build(nested, template)


def _container_like(like: Any, items: dict) -> Any:
    if isinstance(like, nnx.State):
        return nnx.State(items)
    if isinstance(like, FrozenDict):
        return FrozenDict(items)
    return items


def value(leaf: Any) -> Any:
    """The array inside a leaf (unwraps ``nnx.Variable``)."""
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def wrap_like(leaf: Any, array: Any) -> Any:
    """`array` in the same kind of wrapper as `leaf` (a Variable stays a Variable)."""
    return leaf.replace(array) if isinstance(leaf, nnx.Variable) else array


def new_leaf_like(leaf: Any, array: Any) -> Any:
    """A new LoRA leaf beside `leaf`: an ``nnx.Param`` in an NNX tree, else the array."""
    return nnx.Param(array) if isinstance(leaf, nnx.Variable) else array


def flatten_paths(tree: Any) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}``: every leaf of `tree` by its path string, in tree order.

    Example:
      >>> import lora_jax as lj
      >>> lj.flatten_paths({"d": {"kernel": 1, "bias": 2}})
      {'d/kernel': 1, 'd/bias': 2}
    """
    return {path_str(p): leaf for p, leaf in flatten(tree).items()}


def unflatten_paths(flat: Mapping[str, Any], like: Any = None) -> Any:
    """Inverse of `flatten_paths`: the tree of ``{"a/b/kernel": leaf}``, its keys strings.

    Containers that `like` has keep their type (see `unflatten_like`); without it
    every container is a dict.
    """
    return unflatten_like(like, {tuple(p.split("/")): leaf for p, leaf in flat.items()})


def map_with_path(fn: Callable[[Path, Any], Any], tree: Any) -> Any:
    """Maps `fn(path, leaf)` over a tree's leaves, keeping its structure."""
    return unflatten_like(tree, {p: fn(p, leaf) for p, leaf in flatten(tree).items()})


def adapted_weights(flat: Mapping[Path, Any]) -> list[Path]:
    """Paths of the weights that have LoRA factors, in tree order."""
    return [base_of(p) for p in flat if leaf_name(p).endswith(A_SUFFIX)]
