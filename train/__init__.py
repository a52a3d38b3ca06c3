"""The fine-tuning pipeline behind ``lora-jax train`` (train/cli.py).

config.py      typed run config (YAML + dotted overrides)
data.py        data set -> tokenised, grouped train/validation splits (formats.py,
               examples.py, ordering.py) -> fixed-shape batches (batching.py)
mesh.py        every sharding decision: mesh, logical-axis rules, NamedShardings
method.py      what trains: lora | full | bitfit | ft_top2 | adapter_h | adapter_l |
               pre_embed | pre_layer (adapters.py: the bottleneck adapters; prefixes.py:
               prefix tuning; bank.py: k LoRA adapters at once)
optim.py       AdamW, warmup + decay, clipping
step.py        the loss, the train step (accumulation) and the eval step
checkpoint.py  orbax checkpoints and exact resume
adapter.py     the final adapter-only directory and its base-model fingerprint
evaluate.py    validation loss / perplexity
samples.py     greedy generations next to references
metrics.py     metrics.jsonl, TensorBoard, progress bar; plot.py: the loss curve
run.py         one run, start to end
"""
