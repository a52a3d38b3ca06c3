"""``lora-jax merge``, ``lora-jax export --format peft`` and ``lora-jax import-peft``.

    lora-jax merge RUN_OR_ADAPTER_DIR --out DIR
        DIR/config.json, model.safetensors, tokenizer.json, tokenizer_config.json:
            a Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained(DIR)``,
            ``models.load(DIR)``) of the merged weights W + s·A·B;
        DIR/params/: the same merged params as an orbax (StandardSave) tree.
    lora-jax export --format peft RUN_OR_ADAPTER_DIR --out DIR
        DIR/adapter_config.json + adapter_model.safetensors, as PEFT writes them
        (``peft.PeftModel.from_pretrained(base_model, DIR)``).
    lora-jax import-peft PEFT_DIR --model NAME --out ADAPTER_DIR
        a PEFT LoRA adapter as a lora-jax adapter directory (train/adapter.py) for ``NAME``.

RUN_OR_ADAPTER_DIR is a run's ``output_dir`` or its ``adapter/``. The base model is the
one the adapter names, loaded as recorded (``model_options``: dtypes, layer stacking,
added biases) and checked against its fingerprint.

Every ``--out DIR`` is claimed before any work (``train/rundir.py``; kinds ``merged``,
``peft``, ``adapter``): a new or empty directory, or one the same command wrote before.
A directory holding anything else is refused with one line and left untouched, so no
command overwrites a file it did not write; a command that fails before writing takes
back the directory (and mark) it created.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp
from flax import traverse_util
from tokenizers import Tokenizer

import lora_jax as lj
import models
from lora_jax.peft import SKIP_BASE_CHECK, PeftFormatError
from models.hf_export import save_hf
from models.hf_names import peft_module_map, tied_modules
from train import adapter as adapter_lib
from train import layout, rundir
from train.config import ADDED_BIASES

IMPORTED_FROM = "imported_from"  # adapter.json: the PEFT directory an adapter came from


class Adapted(NamedTuple):
    """A base model with an adapter directory applied."""

    model: models.Decoder
    params: Any  # base with the adapter's leaves (LoRA factors, or replaced trained leaves)
    tokenizer: Tokenizer | None
    meta: dict[str, Any]  # the adapter's adapter.json


def adapter_dir(run_or_adapter: str | Path) -> Path:
    """The adapter directory of a run directory, or the adapter directory itself."""
    path = Path(run_or_adapter)
    for candidate in (path, path / layout.ADAPTER_DIR):
        if (candidate / layout.ADAPTER_META_FILE).is_file():
            return candidate
    raise adapter_lib.AdapterError(
        f"{path} is neither a run directory nor an adapter directory: "
        f"no {layout.ADAPTER_META_FILE} in it or in its adapter/"
    )


def load_adapted(run_or_adapter: str | Path, *, check_base: bool = True) -> Adapted:
    """The adapter's base model (stacking, dtype and added biases as recorded), with the
    adapter applied.

    ``check_base=False`` accepts a base whose weights differ from the recorded fingerprint
    (shapes and dtypes must still match).
    """
    directory = adapter_dir(run_or_adapter)
    meta = adapter_lib.read_meta(directory)
    model, base, tokenizer = models.load(meta["model"], **_load_options(meta))
    params = adapter_lib.load_adapter(directory, base, check_weights=check_base)
    return Adapted(model, params, tokenizer, meta)


def _load_options(meta: dict[str, Any]) -> dict[str, Any]:
    """``models.load`` options of the base: as recorded, else read off the fingerprint.

    A base trained with ``model.add_biases`` gets its zero biases again, which the
    fingerprint (taken of the base as loaded for training) includes.
    """
    recorded = meta.get("model_options")
    if recorded:
        added = ADDED_BIASES if recorded.get("add_biases") else {}  # absent in older adapters
        return {k: recorded[k] for k in ("dtype", "param_dtype", "scan_layers")} | added
    leaves = meta["base_fingerprint"]["leaves"]
    return {
        "scan_layers": any(p.startswith("layers/") for p in leaves),
        "param_dtype": leaves["embed_tokens/embedding"]["dtype"],
    }


@contextlib.contextmanager
def claimed(directory: str | Path, kind: str, what: str) -> Iterator[Path]:
    """``rundir.claim`` ``directory`` for the block; if the block raises before writing
    anything there, the mark and the directories the claim created are removed again."""
    path = Path(directory).expanduser().absolute()
    created = path  # the topmost directory the claim creates, if any
    while not created.parent.exists():
        created = created.parent
    existed, marked = path.exists(), rundir.read_mark(path) is not None
    path = rundir.claim(path, kind, what=what)
    try:
        yield path
    except BaseException:
        if not marked and [p.name for p in path.iterdir()] == [rundir.MARK_FILE]:
            with contextlib.suppress(OSError):  # the original error matters more
                (path / rundir.MARK_FILE).unlink()
                if not existed:
                    for empty in (path, *path.parents):
                        empty.rmdir()
                        if empty == created:
                            break
        raise


def merge(run_or_adapter: str | Path, out: str | Path, *, check_base: bool = True) -> Path:
    """Write the merged model to `out` as a Hugging Face checkpoint and an orbax tree.

    `out` must be new, empty, or a directory ``merge`` wrote before (rundir.DirectoryError).
    """
    with claimed(out, layout.Kind.MERGED, "--out directory") as directory:
        adapted = load_adapted(run_or_adapter, check_base=check_base)
        merged = lj.merge(adapted.params) if adapted.meta["method"] == "lora" else adapted.params
        save_hf(directory, adapted.model.config, merged, adapted.tokenizer)
        with ocp.StandardCheckpointer() as checkpointer:
            # force: replaces params/ only in a directory merge claimed (and so wrote)
            checkpointer.save(directory / layout.MERGED_PARAMS_DIR, merged, force=True)
    return Path(out)


def export_peft(run_or_adapter: str | Path, out: str | Path, *, check_base: bool = True) -> Path:
    """Write a LoRA run's adapter to `out` as a PEFT adapter.

    `out` must be new, empty, or a directory ``export`` wrote before (rundir.DirectoryError).
    """
    with claimed(out, layout.Kind.PEFT, "--out directory") as directory:
        adapted = load_adapted(run_or_adapter, check_base=check_base)
        if adapted.meta["method"] != "lora":
            raise adapter_lib.AdapterError(
                f"the adapter was trained with method "
                f"{adapted.meta['method']!r}; only LoRA adapters "
                "export to PEFT (use lora-jax merge for a full "
                "checkpoint)"
            )
        config = adapted.model.config
        lora = adapted.meta.get("lora") or {}
        lj.to_peft(
            directory,
            adapted.params,
            peft_module_map(config),
            tied=tied_modules(config),
            use_rslora=lora.get("use_rslora", False),
            dropout=lora.get("dropout", 0.0),
            base_model_name_or_path=adapted.meta["model"],
        )
    return Path(out)


def import_peft(
    peft_dir: str | Path, model_name: str, out: str | Path, *, check_base: bool = True
) -> Path:
    """Write a PEFT LoRA adapter for `model_name` as a lora-jax adapter directory.

    `out` must be new, empty, or an adapter directory ``import-peft`` wrote before: a
    trained run's adapter, or anything else, is refused (rundir.DirectoryError).
    """
    with claimed(out, layout.Kind.ADAPTER, "--out directory") as directory:
        _check_not_trained(directory)
        model, base, _ = models.load(model_name)
        config = model.config
        params = lj.from_peft(
            peft_dir,
            base,
            peft_module_map(config),
            tied=tied_modules(config),
            check_base=check_base,
            base_name=str(model_name),
        )
        peft_config = lj.peft.read_config(peft_dir)
        adapter = lj.adapter(params)
        targets = sorted({"/".join(p[:-1]) for p in traverse_util.flatten_dict(adapter)})
        lora = lj.LoraConfig(
            rank=peft_config["r"],
            alpha=peft_config["lora_alpha"],
            targets=tuple(f"^{re.escape(t)}/" for t in targets),
            dropout=peft_config.get("lora_dropout", 0.0),
            use_rslora=bool(peft_config.get("use_rslora")),
        )
        return adapter_lib.save_adapter(
            directory,
            adapter,
            method="lora",
            model_name=model_name,
            lora=lora.to_dict(),
            base_fingerprint=adapter_lib.fingerprint(base),
            extra={IMPORTED_FROM: str(Path(peft_dir).absolute())},
        )


def _check_not_trained(directory: Path) -> None:
    """DirectoryError if ``directory`` holds an adapter that no import wrote (a run's)."""
    if not (directory / layout.ADAPTER_META_FILE).is_file():
        return
    try:
        meta = adapter_lib.read_meta(directory)
    except adapter_lib.AdapterError:
        meta = {}
    if IMPORTED_FROM not in meta:
        raise rundir.DirectoryError(
            f"--out directory {directory} holds an adapter that "
            f"import-peft did not write (a training run's); nothing was "
            f"changed. Choose a new or empty directory"
        )


@contextlib.contextmanager
def _command_line_errors() -> Iterator[None]:
    """PeftFormatError messages with the command line's flag for the Python argument."""
    try:
        yield
    except PeftFormatError as e:
        text = str(e).replace(SKIP_BASE_CHECK, "pass --skip-base-check")
        raise PeftFormatError(text) from None


def run_merge(args: argparse.Namespace) -> int:
    print(f"merging the adapter in {args.adapter} into its base model, into {args.out}")
    with _command_line_errors():
        out = merge(args.adapter, args.out, check_base=not args.skip_base_check)
    print(f"merged model: {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    print(f"exporting the adapter in {args.adapter} as {args.format}, into {args.out}")
    with _command_line_errors():
        out = export_peft(args.adapter, args.out, check_base=not args.skip_base_check)
    print(f"PEFT adapter: {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    print(f"importing the PEFT adapter in {args.peft_dir} for {args.model}, into {args.out}")
    with _command_line_errors():
        out = import_peft(args.peft_dir, args.model, args.out, check_base=not args.skip_base_check)
    print(f"adapter: {out}")
    return 0
