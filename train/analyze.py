"""``lora-jax analyze``: the LoRA paper's §7 analysis of trained adapters (``lora_jax.analysis``).

    lora-jax analyze ADAPTER_DIR [ADAPTER_DIR ...] --out DIR [--draws N] [--seed N]
        DIR/analysis.json     the numbers: per adapter, per adapted weight and stacked layer,
                              ΔW against W (§7.3, Table 7); per pair of adapters, the
                              subspace similarity grids φ(i, j) of their A (input) and B
                              (output) factors (§7.2, Figures 3–4)
        DIR/analysis.md       the same as tables (φ summarised by φ(1, 1), φ(r₁, r₂), mean)
        DIR/similarity_<i>_<j>_<A|B>.png   per pair: heat maps of φ of the A (input) or
                              B (output) factors, one panel per weight and layer

ADAPTER_DIR is a LoRA run's directory or its ``adapter/`` (or ``import-peft``'s output).
Each adapter's base is the model its ``adapter.json`` names, loaded as recorded and
checked against its fingerprint (train/export.py ``load_adapted``), so no ``--base`` is
needed; ``--skip-base-check`` accepts a base with other weights, as for ``merge``.
Adapters are loaded one at a time; only their factors are kept for the comparisons.

This is the generic pipeline's, not the E2E study's: it reads any LoRA adapter directory
of any model. ``--out DIR`` is claimed first (``train/rundir.py``, kind ``analysis``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lora_jax as lj
from lora_jax import analysis
from train import export, layout
from train.adapter import AdapterError
from train.errors import UserError
from train.plot import pyplot

JSON_FILE = "analysis.json"
MARKDOWN_FILE = "analysis.md"
# first, second: the adapters' positions on the command line; factor: A or B
SIMILARITY_PNG = "similarity_{first}_{second}_{factor}.png"
FACTOR_SIDES = {"A": "input", "B": "output"}  # which factor's directions φ compares


def _layers(values_S: np.ndarray) -> list[int | None]:
    """The stacked layer index of each entry, None for an unstacked weight."""
    return [None] if len(values_S) == 1 else list(range(len(values_S)))


def update_rows(table: dict[str, analysis.UpdateVsWeight]) -> list[dict[str, Any]]:
    """One JSON row per adapted weight and stacked layer of `analysis.updates_vs_weights`."""
    rows = []
    for path, result in table.items():
        for k, layer in enumerate(_layers(result.delta_norm)):
            row = {"path": path, "layer": layer, "rank": result.rank}
            row |= {f: float(getattr(result, f)[k]) for f in result._fields if f != "rank"}
            rows.append(row)
    return rows


def similarity_rows(by_side: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """One JSON row per shared weight and stacked layer: the φ grid of each side."""
    inputs = by_side["input"]
    return [
        {"path": path, "layer": layer} | {side: by_side[side][path][k].tolist() for side in by_side}
        for path, grid_SxIxJ in inputs.items()
        for k, layer in enumerate(_layers(grid_SxIxJ))
    ]


def _factors_only(params: Any) -> Any:
    """The adapted tree with every non-LoRA leaf replaced by its shape (the factors need only
    W's shape), so a loaded base is not held while the next adapter loads."""
    factors = lj.flatten_paths(lj.adapter(params))
    return lj.unflatten_paths(
        {
            p: factors.get(p, jax.ShapeDtypeStruct(np.shape(v), v.dtype))
            for p, v in lj.flatten_paths(params).items()
        }
    )


def analyze(
    adapter_dirs: list[str],
    out: str | Path,
    *,
    draws: int = analysis.RANDOM_DRAWS,
    seed: int = 0,
    check_base: bool = True,
) -> dict[str, Any]:
    """Write ``analysis.json``, ``analysis.md`` and the heat maps into `out`; returns the JSON.

    `out` must be new, empty, or a directory ``analyze`` wrote before (rundir.DirectoryError).
    """
    if draws < 1:
        raise UserError(
            f"--draws {draws}: the random column needs at least one draw; pass 1 or more"
        )
    with export.claimed(out, layout.Kind.ANALYSIS, "--out directory") as directory:
        adapters, kept = [], []
        for given in adapter_dirs:
            print(f"analysing the adapter in {given} against its base model")
            adapted = export.load_adapted(given, check_base=check_base)
            if adapted.meta["method"] != "lora":
                raise AdapterError(
                    f"{given} was trained with method {adapted.meta['method']!r}; analyze "
                    "reads LoRA factors: pass a LoRA run's adapter directory"
                )
            table = analysis.updates_vs_weights(adapted.params, draws=draws, seed=seed)
            adapters.append(
                {
                    "given": given,  # as on the command line: the report's name for it
                    "dir": str(export.adapter_dir(given).resolve()),
                    "model": adapted.meta["model"],
                    "weights": update_rows(table),
                }
            )
            kept.append(_factors_only(adapted.params))
        pairs = []
        for first in range(len(kept)):
            for second in range(first + 1, len(kept)):
                by_side = {
                    side: _similarities(kept, adapter_dirs, first, second, side)
                    for side in ("input", "output")
                }
                pairs.append(
                    {"first": first, "second": second, "weights": similarity_rows(by_side)}
                )
        result = {
            "paper": "Hu et al. 2021, LoRA, arXiv 2106.09685, section 7",
            "draws": draws,
            "seed": seed,
            "adapters": adapters,
            "similarity": pairs,
        }
        (directory / JSON_FILE).write_text(json.dumps(result, indent=1))
        (directory / MARKDOWN_FILE).write_text(markdown(result))
        for pair in pairs:
            for factor in FACTOR_SIDES:
                path = directory / SIMILARITY_PNG.format(**pair, factor=factor)
                plot_similarity(pair, factor, path)
    return result


def _similarities(kept, adapter_dirs, first: int, second: int, side: str) -> dict:
    try:
        return analysis.subspace_similarities(kept[first], kept[second], side=side)
    except ValueError as e:
        raise UserError(f"{adapter_dirs[first]} against {adapter_dirs[second]}: {e}") from None


def _name(row: dict[str, Any]) -> str:
    return row["path"] if row["layer"] is None else f"{row['path']}[{row['layer']}]"


def markdown(result: dict[str, Any]) -> str:
    """The JSON as tables: Table 7's columns per adapter, φ's corners and mean per pair."""
    lines = [
        "# LoRA §7 analysis",
        "",
        f"‖LᵀWR‖_F: W in r directions L (inputs), R (outputs): ΔW's top-r singular vectors, "
        f"W's own top-r, or random (mean of {result['draws']} draws, seed {result['seed']}); "
        "amplification = ‖ΔW‖_F / ‖LᵀWR‖_F along ΔW's.",
    ]
    for i, entry in enumerate(result["adapters"]):
        lines += [
            "",
            f"## [{i}] {entry['given']} ({entry['model']})",
            "",
            "| weight | r | ‖ΔW‖_F | ‖W‖_F | ΔW's | W's top-r | random | amplification |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {_name(w)} | {w['rank']} | {w['delta_norm']:.4g} | {w['weight_norm']:.4g} | "
            f"{w['along_delta']:.4g} | {w['along_weight']:.4g} | "
            f"{w['along_random']:.4g} | {w['amplification']:.4g} |"
            for w in entry["weights"]
        ]
    for pair in result["similarity"]:
        lines += [
            "",
            f"## φ: [{pair['first']}] against [{pair['second']}]",
            "",
            "φ(i, j) = ‖U_iᵀV_j‖²_F / min(i, j) of the top singular directions of the two "
            "adapters' A (input) and B (output) factors; 1: shared, max(i, j)/n: chance.",
            "",
            "| weight | A: φ(1, 1) | A: φ(r₁, r₂) | A: mean | B: φ(1, 1) | B: φ(r₁, r₂) | B: mean |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for w in pair["weights"]:
            cells = []
            for side in ("input", "output"):
                grid = np.asarray(w[side])
                cells += [f"{grid[0, 0]:.3f}", f"{grid[-1, -1]:.3f}", f"{grid.mean():.3f}"]
            lines.append(f"| {_name(w)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_similarity(pair: dict[str, Any], factor: str, path: Path) -> Path:
    """Heat maps of φ(i, j) of the `factor` ("A" or "B") factors, one per shared weight and
    layer (the paper's Figures 3-4 show A's)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator  # after pyplot(): matplotlib is slow to import

    rows = pair["weights"]
    columns = min(4, len(rows))
    figure, axes = plt.subplots(
        math.ceil(len(rows) / columns),
        columns,
        figsize=(3.2 * columns, 2.8 * math.ceil(len(rows) / columns)),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(rows) :]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        grid = np.asarray(row[FACTOR_SIDES[factor]])
        image = ax.imshow(
            grid,
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            origin="lower",
            extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5),
            aspect="auto",
        )
        ax.set_title(_name(row), fontsize=7)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"j (adapter {pair['second']})", fontsize=7)
        ax.set_ylabel(f"i (adapter {pair['first']})", fontsize=7)
    figure.colorbar(image, ax=axes, label="φ(i, j)")
    figure.suptitle(f"subspace similarity of {factor}: adapter {pair['first']} vs {pair['second']}")
    figure.savefig(path)
    plt.close(figure)
    return path


def run_analyze(args: argparse.Namespace) -> int:
    result = analyze(
        args.adapters,
        args.out,
        draws=analysis.RANDOM_DRAWS if args.draws is None else args.draws,
        seed=args.seed,
        check_base=not args.skip_base_check,
    )
    for entry in result["adapters"]:
        amplification = np.median([w["amplification"] for w in entry["weights"]])
        print(f"{entry['dir']}: median amplification ‖ΔW‖/‖LᵀWR‖ {amplification:.3g}")
    print(f"analysis: {Path(args.out) / JSON_FILE}, {MARKDOWN_FILE}")
    return 0
