"""studies/e2e/latency.py: a row's model as it would serve. LoRA is merged into W (the
base's shapes, so the base's compiled program) and computes the logits the unmerged adapter
computes; any other model is left as it is."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import lora_jax as lj
import models
from studies.e2e.evaluation import Target
from studies.e2e.latency import as_served

import tolerances as tol


def test_lora_serves_merged_and_decodes_as_unmerged():
    config = dataclasses.replace(models.get_config("tiny-llama"), num_layers=2)
    model = models.Decoder(config)
    base = models.init_params(config, jax.random.key(0))
    adapted = lj.init(jax.random.key(1), base, lj.LoraConfig(2, 4.0, r".*/(q|v)_proj/kernel"))
    adapted = jax.tree_util.tree_map_with_path(  # B non-zero: the adapter changes the model
        lambda p, x: x + 0.5 if str(p[-1].key).endswith("_lora_b") else x, adapted
    )
    target = Target(model, adapted, None, None, "lora")
    served = as_served(target)
    assert jax.tree.map(np.shape, served.params) == jax.tree.map(np.shape, base)
    ids_1xL = np.arange(1, 9, dtype=np.int32)[None]
    unmerged = lj.apply(model.apply)({"params": adapted}, ids_1xL)
    merged = model.apply({"params": served.params}, ids_1xL)
    # W + s·A·B formed once (rank 2) vs x·W + s·(x·A)·B: float32 chains over 8 keys
    tol.assert_close(merged, unmerged, tol.logits_atol(config, unmerged, keys=8, rank=2))
    assert not tol.close(merged, model.apply({"params": base}, ids_1xL), 1e-3)
    plain = Target(model, base, None, None, "base")
    assert as_served(plain) is plain
