"""Shared pieces of the train/ tests: a tiny Llama checkpoint directory (config.json,
safetensors, tokenizer.json) that ``models.load`` reads, a small E2E CSV, and run configs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.config import RunConfig, load_config
from train.formats import E2E_INSTRUCTION, chatml_user_turn

REPO_ROOT = Path(__file__).resolve().parents[1]  # the shipped configs/ live here
EOS = "<|im_end|>"
NAMES = ["Zizzi", "Wildwood", "Loch Fyne", "The Eagle", "Aromi", "Cotto", "Giraffe", "Strada"]
FOODS = ["Italian", "Japanese", "French", "English"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, VOCAB = 32, 4, 2, 8, 64, 2, 512


def e2e_rows() -> list[tuple[str, str]]:
    """(mr, ref) pairs: 16 meaning representations with 3 references each."""
    rows = []
    for i, name in enumerate(NAMES):
        for food in FOODS[i % 2 :: 2]:
            mr = f"name[{name}], food[{food}]"
            rows += [
                (mr, f"{name} serves {food} food."),
                (mr, f"{food} food is at {name}."),
                (mr, f"You can eat {food} food at {name}."),
            ]
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]] | None = None) -> Path:
    rows = e2e_rows() if rows is None else rows
    lines = ["mr,ref"] + [f'"{mr}","{ref}"' for mr, ref in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def tokenizer() -> Tokenizer:
    """Byte-level BPE of VOCAB - 12 tokens with the ChatML specials, trained on the rows."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 12,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [chatml_user_turn(E2E_INSTRUCTION + mr) + ref for mr, ref in e2e_rows()]
    tok.train_from_iterator(texts * 3, trainer)
    return tok


def write_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama in Hugging Face layout, with a tokenizer; returns the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    config = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": weight(VOCAB, HIDDEN),
        "model.norm.weight": np.ones(HIDDEN, np.float32),
        "lm_head.weight": weight(VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": weight(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": weight(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": weight(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": weight(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": weight(MLP, HIDDEN),
            p + "mlp.up_proj.weight": weight(MLP, HIDDEN),
            p + "mlp.down_proj.weight": weight(HIDDEN, MLP),
            p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
        }
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def tiny_config(model_dir: Path, csv: Path, output_dir: Path, *overrides: str) -> RunConfig:
    """A fast run: 6 updates of 8 rows, LoRA on q/v, validation on 4 of the 16 MRs."""
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            f"data.path={csv}",
            f"output_dir={output_dir}",
            "data.max_length=40",
            "data.batch_size=8",
            "data.validation_fraction=0.25",
            "optim.max_steps=6",
            "optim.learning_rate=1e-2",
            "optim.warmup_steps=2",
            "lora.rank=4",
            "checkpoint.every_steps=3",
            "checkpoint.async_save=false",
            "eval.every_steps=0",
            "eval.samples=0",
            "logging.every_steps=1",
            "logging.tensorboard=false",
            "mesh.data=1",
            *overrides,
        ],
    )


QUIET = {"log": lambda _: None}  # train(cfg, **QUIET): no log lines
# Dropout and accumulation make the RNG and the data position matter; 6 updates of 2
# batches cross two epoch boundaries (36 training examples, 4 batches per epoch);
# checkpoints at steps 2, 4, 6, saved asynchronously.
RESUME = (
    "optim.grad_accum_steps=2",
    "lora.dropout=0.1",
    "checkpoint.every_steps=2",
    "checkpoint.async_save=true",
)


def snapshot(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record of a run's metrics.jsonl."""
    from train.metrics import read_records

    return [
        (r["step"], r["loss"])
        for r in read_records(run_dir / "metrics.jsonl")
        if r["split"] == "train"
    ]


def refused(argv: list[str], capsys) -> str:
    """The one line a refused ``lora-jax ARGV`` prints: exit status 2, no traceback, and the
    error as the last line of stderr (after any progress bar)."""
    from train.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lora-jax {argv[0]}: error: "), err[-2000:]
    return line


@contextlib.contextmanager
def compilation_cache(directory: Path) -> Iterator[None]:
    """JAX's persistent compilation cache in ``directory`` while inside, then as before.

    Every run jits fresh closures, so the in-memory cache never hits; the persistent one
    (keyed by the compiled program) makes the many identical tiny runs of these tests cheap.
    """
    settings = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
    }
    saved = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def greedy_by_full_forwards(forward, params, prompt_1xP, new):
    """Greedy decoding by full forwards (no KV cache): a second path to models.generate's.
    One fixed length, zero-padded: the decoder is causal, so the logits at position t do
    not see the padding after it."""
    P = prompt_1xP.shape[1]
    ids_1xT = np.zeros((1, P + new), np.int32)
    ids_1xT[:, :P] = prompt_1xP
    logits_fn = jax.jit(lambda ids: forward({"params": params}, ids))
    for t in range(P, P + new):
        ids_1xT[0, t] = int(np.argmax(logits_fn(ids_1xT)[0, t - 1]))
    return ids_1xT[:, P:]
