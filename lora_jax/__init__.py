"""lora-jax: LoRA (Hu et al. 2021) for JAX/Flax as a pure parameter-tree transform.

import lora_jax as lj

config = lj.LoraConfig(rank=8, alpha=16, targets=r".*/(q_proj|v_proj)/kernel")
params = lj.init(key, base_params, config)        # A, B, s beside each target
frozen, trainable = lj.split(params)              # differentiate `trainable` only
tx = lj.optimizer(optax.adamw(2e-4), trainable)   # no state for frozen leaves
logits = lj.apply(model.apply)({"params": lj.combine(frozen, trainable)}, x)
export = lj.merge(params)                         # W + s·A·B, the base tree's shape
bank = lj.stack([adapter_0, adapter_1])           # many adapters of one base, per-example ids
logits = lj.apply(model.apply)({"params": lj.combine(base, bank)}, x, adapter_ids=ids)
"""

from lora_jax import analysis
from lora_jax._apply import apply, infer_layout
from lora_jax._arithmetic import compress, weighted_sum
from lora_jax._bank import has_bank, put, stack, unstack
from lora_jax._config import LoraConfig
from lora_jax._init import init
from lora_jax._layout import Layout
from lora_jax._merge import materialize, merge, merge_error, unmerge
from lora_jax._partition import adapter, bias_mask, combine, optimizer, split, trainable_mask
from lora_jax._quantize import QuantizedArray, dequantize, quantize
from lora_jax._residual import convert_to_lora
from lora_jax._summary import summary
from lora_jax._tree import flatten_paths, unflatten_paths
from lora_jax.peft import from_peft, to_peft
from lora_jax.sharding import partition_specs

__all__ = [
    "Layout",
    "LoraConfig",
    "QuantizedArray",
    "adapter",
    "analysis",
    "apply",
    "bias_mask",
    "combine",
    "dequantize",
    "compress",
    "convert_to_lora",
    "flatten_paths",
    "from_peft",
    "has_bank",
    "infer_layout",
    "init",
    "materialize",
    "merge",
    "merge_error",
    "optimizer",
    "partition_specs",
    "put",
    "quantize",
    "split",
    "stack",
    "summary",
    "to_peft",
    "trainable_mask",
    "unflatten_paths",
    "unmerge",
    "unstack",
    "weighted_sum",
]
