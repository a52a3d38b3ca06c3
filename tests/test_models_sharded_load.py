"""`models.load(..., shardings=fn)`: two processes on localhost (``jax.distributed``, 4 CPU
devices each) load a model sharded 8 ways along its ``embed`` axis; each process holds and
reads only its half, and every shard equals the same block of a single-process load bit for
bit. In-process: the views loading reads through, and the errors of a bad shardings tree."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors.numpy import save_file
from test_train_multiprocess import free_port

import models
from models.hf_export import save_hf
from models.loaders.lazy import LazyTensor, stack

import train_fixtures as tf

DRIVER = Path(__file__).with_name("sharded_load_driver.py")
EMBED_OVER_FSDP = {"mesh": [1, 8, 1], "rules": {"embed": "fsdp"}}
# the pipeline's rules (train/mesh.py LOGICAL_RULES) over a 2-D mesh
EVERY_AXIS = {
    "mesh": [1, 4, 2],
    "rules": {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}
    | {"vocab": "tensor"},
}
SMALL = {"tiny-gpt2": {"scan_layers": True}, "tiny-llama": {"attention_bias": True}}

# A Llama with a tiny vocabulary whose weights are almost all in its 16 layers of small
# matrices (the largest, an MLP matrix, is 1/63 of the model): 63.2M float32 parameters,
# 253 MB, so that the process's half (126 MB) dwarfs what the runtime itself allocates
# while loading (about 10 MB), and no single tensor read at a time weighs in the bound.
HIDDEN, MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 512, 2048, 16, 8, 4, 64, 256


def write_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """A random float32 Llama in Hugging Face layout (names and (out, in) matrices written
    out here, not through models/families.py); returns its tensors."""
    directory.mkdir()
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
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "input_layernorm.weight": (HIDDEN,),
            layer + "post_attention_layernorm.weight": (HIDDEN,),
            layer + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            layer + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            layer + "mlp.gate_proj.weight": (MLP, HIDDEN),
            layer + "mlp.up_proj.weight": (MLP, HIDDEN),
            layer + "mlp.down_proj.weight": (HIDDEN, MLP),
        }
    tensors = {name: rng.standard_normal(shape, np.float32) for name, shape in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def run_processes(tmp_path: Path, checks: list[dict]) -> list[list[dict]]:
    """Every process's results (sharded_load_driver.py) of the same `checks`."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    address = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(DRIVER), address, "2", str(i), str(out), json.dumps(checks)],
            cwd=tf.REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    try:
        logs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for w, log in zip(workers, logs, strict=True):
        assert w.returncode == 0, log[-3000:]
    return [json.loads(out.read_text()) for out in outs]


def assert_shards_equal(results: list[dict], single: dict, processes: int = 2) -> None:
    """The shards of all processes cover each parameter of `single` (a one-process load) 8
    times over disjoint or equal blocks, and each equals that block of it, bit for bit."""
    flat = {
        "/".join(k.key for k in path): np.asarray(a)
        for path, a in jax.tree_util.tree_flatten_with_path(single)[0]
    }
    assert [sorted(r["shards"]) for r in results] == [sorted(flat)] * processes
    for name, array in flat.items():
        shards = [s for r in results for s in r["shards"][name]]
        assert len(shards) == 8, name
        covered = np.zeros(array.shape, bool)
        for shard in shards:
            block = array[tuple(slice(*i) for i in shard["index"])]
            assert shard["dtype"] == str(array.dtype), name
            digest = hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest()
            assert shard["sha256"] == digest, f"{name} {shard['index']}"
            covered[tuple(slice(*i) for i in shard["index"])] = True
        assert covered.all(), name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path_factory.mktemp("sharded") / "llama"
    return directory, write_checkpoint(directory)


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{preset: HF checkpoint dir} of random tiny-gpt2 (q/k/v fused in c_attn) and tiny-llama."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    directories = {}
    for name in SMALL:
        model, shapes = models.abstract_load(name)
        params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
        directories[name] = save_hf(root / name, model.config, params)
    return directories


@pytest.fixture(scope="module")
def two_processes(checkpoint, small_checkpoints, tmp_path_factory) -> list[list[dict]]:
    """Both processes' results of loading the checkpoint float32 unscanned, then bfloat16
    with its layers stacked (scan_layers), embed sharded 8 ways; then the small checkpoints
    with `SMALL`'s options over `EVERY_AXIS`."""
    small = [
        {"source": str(directory), "options": SMALL[name], **EVERY_AXIS}
        for name, directory in small_checkpoints.items()
    ]
    checks = [
        {"source": str(checkpoint[0]), "options": {}, **EMBED_OVER_FSDP},
        {
            "source": str(checkpoint[0]),
            "options": {"scan_layers": True, "param_dtype": "bfloat16"},
            **EMBED_OVER_FSDP,
        },
        *small,
    ]
    return run_processes(tmp_path_factory.mktemp("processes"), checks)


def test_each_process_holds_and_reads_about_half_the_model(checkpoint, two_processes):
    full_bytes = sum(t.nbytes for t in checkpoint[1].values())
    for process in two_processes:
        unscanned = process[0]
        # Its 4 of 8 shards are half the model. Loading adds one parameter's block at a time
        # (< 1/63 of the model, as read and as placed) and the runtime's and the allocator's
        # own few MB (measured on one x86 machine: peak 0.547, after the load 0.531 of the
        # model), so 0.6 leaves room for those and no more: one process reading a whole
        # tensor per device or holding a host copy of the model would exceed it.
        increase = (unscanned["rss_peak_kb"] - unscanned["rss_before_kb"]) * 1024
        assert increase <= 0.6 * full_bytes, (increase / full_bytes, unscanned)


def test_sharded_load_equals_one_process_load(checkpoint, two_processes):
    directory, tensors = checkpoint
    _, single, _ = models.load(directory)
    # the one-process load against the file itself (q_proj's kernel is its weight (out, in)
    # transposed), so that both sides agreeing is agreement with the checkpoint
    np.testing.assert_array_equal(
        single["layers_3"]["self_attn"]["q_proj"]["kernel"],
        tensors["model.layers.3.self_attn.q_proj.weight"].T,
    )
    assert_shards_equal([p[0] for p in two_processes], single)
    _, single, _ = models.load(directory, scan_layers=True, param_dtype="bfloat16")
    assert_shards_equal([p[1] for p in two_processes], single)


def test_fused_and_added_tensors_shard_like_one_process_load(small_checkpoints, two_processes):
    """GPT-2's q/k/v cut from its fused c_attn (scanned), and the zero biases an option adds
    to Llama, over embed x heads/MLP/vocab blocks."""
    for i, (name, directory) in enumerate(small_checkpoints.items(), start=2):
        _, single, _ = models.load(directory, **SMALL[name])
        assert_shards_equal([p[i] for p in two_processes], single)


@pytest.mark.slow
def test_sharded_gguf_equals_one_process_load(tmp_path):
    """The embedded SmolLM2-135M (GGUF, Q4_1/Q8_0 blocks dequantised by rows, llama.cpp's Q/K
    rows reordered) over `EVERY_AXIS`: embed over fsdp, heads / MLP / vocab over tensor."""
    results = run_processes(tmp_path, [{"source": "smollm2-135m", "options": {}, **EVERY_AXIS}])
    _, single, _ = models.load("smollm2-135m")
    assert_shards_equal([p[0] for p in results], single)


def test_lazy_views_index_like_numpy():
    """Transposes, outer indexing (slices and int arrays, as np.ix_) and stacking of views
    read the same elements as numpy does on the array in memory."""
    a = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    reads = []
    view = LazyTensor.of(a.shape, lambda idx: reads.append(idx) or a[np.ix_(*idx)])
    rows = np.array([4, 0, 3])
    got = view.T[1:4][..., rows]
    assert got.shape == (3, 3) and not reads  # nothing read until converted
    np.testing.assert_array_equal(np.asarray(got), a.T[1:4][:, rows])
    assert [list(i) for i in reads[0]] == [[4, 0, 3], [1, 2, 3]]  # only those elements
    stacked = stack([view, LazyTensor.wrap(a + 100)])
    np.testing.assert_array_equal(np.asarray(stacked[1:, 2:4]), np.stack([a, a + 100])[1:, 2:4])


def test_default_is_this_process_first_device_and_bad_trees_say_what_is_wrong(tmp_path):
    directory = tf.write_tiny_llama(tmp_path / "model")
    _, params, _ = models.load(directory)
    assert {leaf.sharding for leaf in jax.tree.leaves(params)} == {
        SingleDeviceSharding(jax.local_devices()[0])
    }
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
    replicated = NamedSharding(mesh, PartitionSpec())

    def without_norm(model, shapes):
        tree = jax.tree.map(lambda _: replicated, shapes)
        del tree["norm"]
        return tree

    with pytest.raises(ValueError, match=r"missing \['norm/scale'\]") as e:
        models.load(directory, shardings=without_norm)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"not a Sharding at \['norm/scale'\]"):
        models.load(
            directory,
            shardings=lambda model, shapes: without_norm(model, shapes) | {"norm": {"scale": 1}},
        )
