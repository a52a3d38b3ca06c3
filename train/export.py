"""``lora-jax merge``, ``lora-jax export --format peft|gguf`` and ``lora-jax import-peft``.

    lora-jax merge RUN_OR_ADAPTER_DIR --out DIR [--base-only] [--orbax]
        DIR/config.json, model.safetensors, tokenizer.json, tokenizer_config.json (mode 0644):
            a Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained(DIR)``,
            ``models.load(DIR)``) of the merged weights W + s·A·B, written tensor by tensor
            (models/hf_export.py); ``--base-only``: of the base without the adapter (the
            transformers base of a GGUF-loaded model, for PEFT);
        DIR/params/ (``--orbax`` only): the same merged params as an orbax (StandardSave) tree.
    lora-jax export --format peft RUN_OR_ADAPTER_DIR --out DIR [--base-model-name-or-path P]
            [--serving-safe]
        DIR/adapter_config.json + adapter_model.safetensors, as PEFT writes them
        (``peft.AutoPeftModelForCausalLM.from_pretrained(DIR)``); ``base_model_name_or_path``
        is P, by default the base's checkpoint directory (a GGUF base has none: write one
        with ``merge --base-only``). ``--serving-safe``: one rank, one alpha, scales folded
        into lora_B (train/peft_uniform.py), for engines that take one scale per adapter.
    lora-jax export --format gguf RUN_OR_ADAPTER_DIR --out FILE.gguf
        a llama.cpp LoRA adapter (models/gguf_export.py) for the base's GGUF file
        (``llama-cli -m BASE.gguf --lora FILE.gguf``). FILE is written whole or not at all,
        and replaces only a file this command wrote.
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
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp
from flax import traverse_util
from tokenizers import Tokenizer

import lora_jax as lj
import models
from lora_jax.peft import SKIP_BASE_CHECK, PeftFormatError
from models.gguf_export import save_gguf_adapter
from models.hf_export import save_hf
from models.hf_names import peft_module_map, tied_modules
from train import adapter as adapter_lib
from train import adapters as bottleneck
from train import layout, peft_uniform, prefixes, rundir
from train.config import ADDED_BIASES

IMPORTED_FROM = "imported_from"  # adapter.json: the PEFT directory an adapter came from
GGUF_SOURCE_KEY = "lora_jax.exported_from"  # a GGUF adapter's header: the adapter directory


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
    several = sorted(
        p.name for p in path.glob("adapter_*") if (p / layout.ADAPTER_META_FILE).is_file()
    )
    if several:
        raise adapter_lib.AdapterError(
            f"{path} is a run of {len(several)} adapters; give one of them, e.g. "
            f"{path / several[0]}"
        )
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


def merge(
    run_or_adapter: str | Path,
    out: str | Path,
    *,
    check_base: bool = True,
    base_only: bool = False,
    orbax: bool = False,
) -> Path:
    """Write the merged model (``base_only``: the base alone) to `out` as a Hugging Face
    checkpoint, streamed tensor by tensor; ``orbax``: also the merged tree in orbax.

    `out` must be new, empty, or a directory ``merge`` wrote before (rundir.DirectoryError).
    """
    if not base_only:
        _refuse_unmergeable(adapter_lib.read_meta(adapter_dir(run_or_adapter)), "merged into W")
    with claimed(out, layout.Kind.MERGED, "--out directory") as directory:
        if base_only:
            meta = adapter_lib.read_meta(adapter_dir(run_or_adapter))
            adapted = Adapted(*models.load(meta["model"], **_load_options(meta)), meta)
        else:
            adapted = load_adapted(run_or_adapter, check_base=check_base)
        params = adapted.params
        save_hf(directory, adapted.model.config, params, adapted.tokenizer, merge=True)
        if orbax:
            with ocp.StandardCheckpointer() as checkpointer:
                # force: replaces params/ only in a directory merge claimed (and so wrote)
                checkpointer.save(
                    directory / layout.MERGED_PARAMS_DIR, lj.merge(params), force=True
                )
    return Path(out)


def base_model_name_or_path(meta: dict[str, Any]) -> str:
    """Where transformers finds the adapter's base: its checkpoint directory (absolute).

    Raises AdapterError, naming ``merge --base-only``, for a base transformers cannot load
    by that name (an embedded model or a GGUF file)."""
    model = meta["model"]
    if Path(model).is_dir():
        return str(Path(model).absolute())
    raise adapter_lib.AdapterError(
        f"the base {model!r} is a GGUF model, which transformers cannot load by name; write "
        "it as a transformers checkpoint with `lora-jax merge --base-only RUN_OR_ADAPTER_DIR "
        "--out BASE_DIR` and pass --base-model-name-or-path BASE_DIR (or a hub id)"
    )


def export_peft(
    run_or_adapter: str | Path,
    out: str | Path,
    *,
    check_base: bool = True,
    base_model: str | None = None,
    serving_safe: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Write a LoRA run's adapter to `out` as a PEFT adapter whose
    ``base_model_name_or_path`` is `base_model` (default: `base_model_name_or_path`).

    ``serving_safe``: normalised by `peft_uniform.uniform` (one r, alpha = r, no rsLoRA);
    each change is passed to `say`, in words.
    `out` must be new, empty, or a directory ``export`` wrote before (rundir.DirectoryError).
    """
    with claimed(out, layout.Kind.PEFT, "--out directory") as directory:
        adapted = _lora_adapted(run_or_adapter, check_base, "PEFT")
        base_model = base_model or base_model_name_or_path(adapted.meta)
        config = adapted.model.config
        lora = adapted.meta.get("lora") or {}
        params, changes = adapted.params, []
        if serving_safe:
            params, changes = peft_uniform.uniform(params)
        lj.to_peft(
            directory,
            params,
            peft_module_map(config),
            tied=tied_modules(config),
            use_rslora=lora.get("use_rslora", False) and not serving_safe,
            dropout=lora.get("dropout", 0.0),
            base_model_name_or_path=base_model,
        )
        if serving_safe:
            _check_uniform(directory)
            for change in changes or ["nothing: the adapter had one rank and scale 1"]:
                say(f"serving-safe: {change}")
    return Path(out)


def _check_uniform(directory: Path) -> None:
    """PeftFormatError unless the written adapter has one r and one alpha (a fused module,
    GPT-2's c_attn, has the sum of its parts' ranks)."""
    written = lj.peft.read_config(directory)
    if written["rank_pattern"] or written["alpha_pattern"]:
        raise PeftFormatError(
            f"the adapter cannot be given one rank: fused modules get the sum of their parts' "
            f"ranks ({written['rank_pattern']}); adapt all of q, k, v or none of them"
        )


def _lora_adapted(run_or_adapter: str | Path, check_base: bool, target: str) -> Adapted:
    """`load_adapted`, refusing an adapter that is not LoRA factors (`target`: the format)."""
    _refuse_unmergeable(adapter_lib.read_meta(adapter_dir(run_or_adapter)), f"exported to {target}")
    adapted = load_adapted(run_or_adapter, check_base=check_base)
    if adapted.meta["method"] != "lora":
        raise adapter_lib.AdapterError(
            f"the adapter was trained with method {adapted.meta['method']!r}; only LoRA "
            f"adapters export to {target} (use lora-jax merge for a full checkpoint)"
        )
    return adapted


def _refuse_unmergeable(meta: dict[str, Any], what: str) -> None:
    """AdapterError for a bottleneck adapter run (adapter_h / adapter_l: extra layers) or a
    prefix run (pre_embed / pre_layer: extra positions): not a change of W, so it cannot be
    `what`."""
    kind = {
        **dict.fromkeys(bottleneck.SUBLAYERS, "bottleneck adapters are extra layers"),
        **dict.fromkeys(prefixes.DESIGNS, "a prefix is extra positions before every row"),
    }.get(meta["method"])
    if kind:
        raise adapter_lib.AdapterError(
            f"the adapter was trained with method {meta['method']!r}: {kind} and cannot "
            f"be {what}; decode the run with lora-jax eval"
        )


def export_gguf(run_or_adapter: str | Path, out: str | Path, *, check_base: bool = True) -> Path:
    """Write a LoRA run's adapter to the file `out` as a llama.cpp GGUF LoRA adapter.

    `out` must not exist, or be a GGUF adapter this command wrote (its header names
    ``GGUF_SOURCE_KEY``); anything else is refused (rundir.DirectoryError). The file is
    written beside `out` and renamed into place: a failure leaves nothing.
    """
    out = Path(out).expanduser().absolute()
    _check_replaceable_gguf(out)
    directory = adapter_dir(run_or_adapter)
    adapted = _lora_adapted(directory, check_base, "GGUF")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        save_gguf_adapter(
            partial,
            adapted.model.config,
            adapted.params,
            metadata={
                GGUF_SOURCE_KEY: str(directory.absolute()),
                "lora_jax.base": adapted.meta["model"],
            },
        )
        os.chmod(partial, 0o644)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _check_replaceable_gguf(out: Path) -> None:
    if not out.exists():
        return
    import gguf

    try:
        written = GGUF_SOURCE_KEY in gguf.GGUFReader(out).fields
    except Exception:  # not a GGUF file at all
        written = False
    if not written or not out.is_file():
        raise rundir.DirectoryError(
            f"--out {out} exists and was not written by lora-jax export --format gguf; "
            "nothing was changed. Choose a new file name"
        )


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
    what = "writing the base model of" if args.base_only else "merging into its base model"
    print(f"{what} the adapter in {args.adapter}, into {args.out}")
    with _command_line_errors():
        out = merge(
            args.adapter,
            args.out,
            check_base=not args.skip_base_check,
            base_only=args.base_only,
            orbax=args.orbax,
        )
    print(f"{'base' if args.base_only else 'merged'} model: {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    print(f"exporting the adapter in {args.adapter} as {args.format}, into {args.out}")
    check_base = not args.skip_base_check
    if args.format == "gguf" and (args.base_model_name_or_path or args.serving_safe):
        raise adapter_lib.AdapterError(
            "--base-model-name-or-path and --serving-safe are PEFT options; "
            "drop them for --format gguf"
        )
    with _command_line_errors():
        if args.format == "gguf":
            out = export_gguf(args.adapter, args.out, check_base=check_base)
            print(f"llama.cpp LoRA adapter: {out}")
            return 0
        out = export_peft(
            args.adapter,
            args.out,
            check_base=check_base,
            base_model=args.base_model_name_or_path,
            serving_safe=args.serving_safe,
        )
    print(f"PEFT adapter: {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    print(f"importing the PEFT adapter in {args.peft_dir} for {args.model}, into {args.out}")
    with _command_line_errors():
        out = import_peft(args.peft_dir, args.model, args.out, check_base=not args.skip_base_check)
    print(f"adapter: {out}")
    return 0
