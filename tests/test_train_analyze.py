"""``lora-jax analyze`` (train/analyze.py): two tiny adapters of ranks 4 and 2, written by the
pipeline's own writer, analysed by the command; its JSON equals the library's figures for
the same adapters loaded onto their base, and bad input is one line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import models
from lora_jax import analysis
from train import adapter as adapter_lib
from train import analyze as analyze_lib
from train import cli, layout, rundir
from train import method as method_lib
from train.config import LoraSection

import train_fixtures as tf


def _write_adapter(root, model_dir, base, rank, seed, method="lora"):
    section = LoraSection(rank=rank, targets=(".*/(q_proj|v_proj)/kernel",))
    params, mask = method_lib.prepare(method, base, section, jax.random.key(seed))
    rng = np.random.default_rng(seed)  # a trained-looking B (lj.init's is zero)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key == "kernel_lora_b" else x
        ),
        params,
    )
    return adapter_lib.save_adapter(
        root / f"adapter_r{rank}_{method}",
        adapter_lib.artifact(params, mask, base),
        method=method,
        model_name=str(model_dir),
        lora=method_lib.lora_config(section).to_dict() if method == "lora" else None,
        base_fingerprint=adapter_lib.fingerprint(base),
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(base params, rank-4 adapter directory, rank-2 adapter directory, root)."""
    root = tmp_path_factory.mktemp("analyze")
    model_dir = tf.write_tiny_llama(root / "model")
    _, base, _ = models.load(model_dir)
    return (
        base,
        _write_adapter(root, model_dir, base, 4, 0),
        _write_adapter(root, model_dir, base, 2, 1),
        root,
    )


def test_the_command_writes_the_libraries_figures_and_a_heat_map(adapters, tmp_path):
    base, four, two, _ = adapters
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(four), str(two), "--out", str(out), "--draws", "3"]) == 0
    written = json.loads((out / analyze_lib.JSON_FILE).read_text())
    assert rundir.owned(out, layout.Kind.ANALYSIS)
    report = (out / analyze_lib.MARKDOWN_FILE).read_text()
    assert report.count("| layers_1/self_attn/q_proj") == 3
    assert f"## [0] {four} (" in report and f"## [1] {two} (" in report  # named as given
    for factor in ("A", "B"):
        path = out / analyze_lib.SIMILARITY_PNG.format(first=0, second=1, factor=factor)
        assert path.stat().st_size > 0

    loaded = [adapter_lib.load_adapter(d, base) for d in (four, two)]
    for entry, params in zip(written["adapters"], loaded):
        table = analysis.updates_vs_weights(params, draws=3, seed=0)
        assert [w["path"] for w in entry["weights"]] == list(table)
        for row in entry["weights"]:
            expected = table[row["path"]]
            assert row["layer"] is None and row["rank"] == expected.rank
            for field in expected._fields[1:]:  # the same float64 computation: equal
                assert row[field] == float(getattr(expected, field)[0]), field
    (pair,) = written["similarity"]
    assert (pair["first"], pair["second"]) == (0, 1)
    for side in ("input", "output"):
        grids = analysis.subspace_similarities(*loaded, side=side)
        assert [w["path"] for w in pair["weights"]] == list(grids)
        for row in pair["weights"]:
            assert np.shape(row[side]) == (4, 2)
            np.testing.assert_array_equal(row[side], grids[row["path"]][0])


def test_a_non_lora_adapter_is_one_line(adapters, tmp_path, capsys):
    base, four, _, root = adapters
    full = _write_adapter(root, str(root / "model"), base, 4, 2, method="full")
    line = tf.refused(["analyze", str(four), str(full), "--out", str(tmp_path / "x")], capsys)
    assert "trained with method 'full'" in line and "LoRA" in line
    assert not (tmp_path / "x").exists()  # the claimed directory is taken back


def test_no_random_draws_is_one_line_before_any_work(adapters, tmp_path, capsys):
    _, four, _, _ = adapters
    out = tmp_path / "x"
    line = tf.refused(["analyze", str(four), "--out", str(out), "--draws", "0"], capsys)
    assert "--draws 0" in line and "at least one" in line
    assert not out.exists()
