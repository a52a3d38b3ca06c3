"""Bad input is one clear line, never a traceback: malformed CSV and JSON files (named by file
and line, skipped and counted where a row can be), a 10 MB field (cut before tokenising), and
LoRA targets checked against the model's parameter paths before any weight is loaded."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

import models
from models.loaders.gguf import config_from_gguf, field, read_f32, read_metadata
from train.cli import main
from train.config import ConfigError, DataConfig, save_config
from train.data import DataError, build_splits, load_table
from train.examples import char_limit
from train.method import check_targets

import train_fixtures as tf

HEADER = "mr,ref\n"
GOOD = "".join(f'"{mr}","{ref}"\n' for mr, ref in tf.e2e_rows()[:12])  # lines 2-13


@pytest.fixture(scope="module")
def tokenizer():
    return tf.tokenizer()


def config(path, **fields):
    return DataConfig(
        eos_token=tf.EOS, path=str(path), validation_fraction=0.0, max_length=64, **fields
    )


def write(path, data: bytes | str):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def error(cfg, tokenizer) -> str:
    """The DataError of building ``cfg``'s splits: one line."""
    with pytest.raises(DataError) as e:
        build_splits(cfg, tokenizer, seed=0)
    message = str(e.value)
    assert "\n" not in message
    return message


# --- CSV: a file that cannot be read at all is an error naming it --------------------------


def test_an_empty_csv_names_the_file_and_asks_for_a_header(tmp_path, tokenizer):
    path = write(tmp_path / "empty.csv", "")
    assert error(config(path), tokenizer) == (
        f"data file {path} is empty: a CSV needs a header line naming its columns (e.g. mr,ref) "
        f"and then one row per example"
    )
    write(path, "\n\n")  # blank lines only: as empty
    assert "is empty" in error(config(path), tokenizer)


def test_a_header_only_csv_names_the_file_and_the_columns_needed(tmp_path, tokenizer):
    path = write(tmp_path / "header.csv", HEADER)
    message = error(config(path), tokenizer)
    assert message.startswith(
        f"could not read data file {path}: it has a header line (mr,ref) "
        f"but no rows; data.format='e2e' needs the columns [mr (or "
        f"meaning_representation), ref (or reference / human_reference)]"
    )
    prompt = write(tmp_path / "p.csv", "prompt,completion\n")
    assert "data.format='e2e' needs the columns [mr" in error(config(prompt), tokenizer)
    assert "needs the columns [prompt, completion]" in error(
        config(prompt, format="prompt_completion"), tokenizer
    )


def test_csv_columns_not_found_name_the_file_and_the_columns_needed(tmp_path, tokenizer):
    path = write(tmp_path / "cols.csv", "meaning,text\n" + GOOD)
    message = error(config(path), tokenizer)
    assert message.startswith(
        f"data file {path} lacks columns ['mr', 'ref'] (it has "
        f"['meaning', 'text']); data.format='e2e' needs the columns [mr"
    )


def test_an_unterminated_quote_is_an_error_naming_its_line_whatever_the_policy(tmp_path, tokenizer):
    unquoted = [f"{mr.replace(',', ';')},{ref}\n" for mr, ref in tf.e2e_rows()[:12]]
    path = write(
        tmp_path / "quote.csv",
        HEADER + "".join(unquoted[:4]) + 'name[Oops],"An open quote\n' + "".join(unquoted[4:]),
    )
    for policy in ("skip", "error"):
        assert error(config(path, on_malformed=policy), tokenizer) == (
            f"data file {path}, line 6: a quoted field in the row starting here is never closed, "
            f"so the rest of the file (lines 6-14) would be one field; close the quote, and "
            f'write a quote inside a quoted field as two ("")'
        )


def test_a_row_with_an_extra_field_is_skipped_and_counted_or_named(tmp_path, tokenizer):
    path = write(tmp_path / "extra.csv", HEADER + '"name[A]","A is.","surplus"\n' + GOOD)
    splits = build_splits(config(path), tokenizer, seed=0)
    assert splits.report.skipped == {"extra_fields": 1} and splits.report.rows == 13
    assert len(splits.train) == 12 and "1 extra_fields" in splits.report.summary()
    assert error(config(path, on_malformed="error"), tokenizer) == (
        f"data file {path}, line 2: the row has 3 fields but the header has 2 (mr,ref); quote a "
        f"field that holds a comma, or remove the extra field; fix the file or set "
        f"data.on_malformed=skip"
    )
    with pytest.raises(DataError, match=r"remove the extra field; fix the file$"):
        load_table(str(path))  # as lora-jax eval reads it: no data.on_malformed to set


def test_a_quote_followed_by_text_is_skipped_and_counted_or_named(tmp_path, tokenizer):
    path = write(tmp_path / "bad.csv", HEADER + GOOD + '"name[B]"x,"B is."\n')
    splits = build_splits(config(path), tokenizer, seed=0)
    assert splits.report.skipped == {"bad_quote": 1} and len(splits.train) == 12
    message = error(config(path, on_malformed="error"), tokenizer)
    assert message.startswith(f"data file {path}, line 14: ',' expected after '\"'")


def test_a_row_that_is_not_utf8_is_skipped_and_counted_or_named(tmp_path, tokenizer):
    path = write(
        tmp_path / "latin1.csv",
        HEADER.encode() + b'"name[Caf\xe9]","Caf\xe9 is."\n' + GOOD.encode(),
    )
    splits = build_splits(config(path), tokenizer, seed=0)
    assert splits.report.skipped == {"not_utf8": 1} and len(splits.train) == 12
    assert error(config(path, on_malformed="error"), tokenizer) == (
        f"data file {path}: line 2 is not UTF-8 text (byte b'\\xe9' at byte 10 of the line); "
        f"re-save the file as UTF-8; fix the file or set data.on_malformed=skip"
    )


def test_a_header_that_is_not_utf8_and_a_utf16_file_are_errors(tmp_path, tokenizer):
    path = write(tmp_path / "h.csv", b"m\xe9,ref\n" + GOOD.encode())
    assert error(config(path), tokenizer).startswith(
        f"data file {path}: the header: line 1 is not UTF-8 text"
    )
    utf16 = write(tmp_path / "u.csv", (HEADER + GOOD).encode("utf-16"))
    assert error(config(utf16), tokenizer) == (
        f"data file {utf16} is UTF-16 text; re-save it as UTF-8"
    )


def test_csv_cells_are_text_and_only_an_empty_cell_is_missing(tmp_path, tokenizer):
    """pandas made 'NA'/'None' missing and numbers numbers; a text row is kept as written."""
    path = write(
        tmp_path / "na.csv",
        HEADER + GOOD + '"name[NA]",NA\n"name[7]",7\n'
        '"name[E]",\n\n"name[F]","F, ""quoted"" and\nmulti-line."\n',
    )
    table = load_table(str(path))
    assert table.to_list()[-4:] == [
        {"mr": "name[NA]", "ref": "NA"},
        {"mr": "name[7]", "ref": "7"},
        {"mr": "name[E]", "ref": None},
        {"mr": "name[F]", "ref": 'F, "quoted" and\nmulti-line.'},
    ]
    assert table.lines[-4:] == [14, 15, 16, 18]
    splits = build_splits(config(path), tokenizer, seed=0)
    assert splits.report.skipped == {"missing": 1} and len(splits.train) == 15


def test_line_ends_may_be_lf_crlf_or_a_lone_cr(tmp_path, tokenizer):
    built = [
        build_splits(
            config(write(tmp_path / f"{name}.csv", (HEADER + GOOD).replace("\n", end))),
            tokenizer,
            seed=0,
        )
        for name, end in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r"))
    ]
    assert all(b.report.rows == 12 and not b.report.skipped for b in built)
    for other in built[1:]:
        assert [e.ids_L.tolist() for e in other.train] == [e.ids_L.tolist() for e in built[0].train]


def test_unreadable_paths_are_named(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "dir.csv").mkdir()
    assert error(config(tmp_path / "dir.csv"), tokenizer).startswith(
        f"data file {tmp_path / 'dir.csv'} is a directory, not a file"
    )
    path = write(tmp_path / "locked.csv", HEADER + GOOD)
    real_open = pathlib.Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    assert error(config(path), tokenizer) == (
        f"cannot read data file {path}: Permission denied; check that it is a file you may read"
    )


def test_a_broken_parquet_file_is_one_line(tmp_path, tokenizer, caplog):
    path = write(tmp_path / "d.parquet", b"garbage")
    assert error(config(path), tokenizer).startswith(
        f"could not read data file {path} as parquet: Parquet file size is 7 bytes"
    )
    assert not [r for r in caplog.records if r.name.startswith("datasets")]


# --- JSON and JSON Lines -------------------------------------------------------------------


def jsonl(rows):
    return "".join(json.dumps({"mr": mr, "ref": ref}) + "\n" for mr, ref in rows)


def test_malformed_json_lines_are_skipped_and_counted_or_named(tmp_path, tokenizer):
    path = write(
        tmp_path / "d.jsonl",
        jsonl(tf.e2e_rows()[:6])
        + '{"mr": "name[X]", "ref": \n'
        + "[1, 2]\n\n"
        + jsonl(tf.e2e_rows()[6:12]),
    )
    splits = build_splits(config(path), tokenizer, seed=0)
    assert splits.report.skipped == {"bad_json": 1, "not_object": 1}
    assert splits.report.rows == 14 and len(splits.train) == 12
    assert error(config(path, on_malformed="error"), tokenizer).startswith(
        f"data file {path}, line 7: not valid JSON (Expecting value: column 25); each line "
        f"must hold one JSON object"
    )
    garbage = write(tmp_path / "g.jsonl", "not json\n" * 3)
    assert error(config(garbage), tokenizer).startswith(
        f"all 3 rows of '{garbage}' were skipped ({{'bad_json': 3}})"
    )
    empty = write(tmp_path / "e.jsonl", "\n")
    assert error(config(empty), tokenizer).startswith(
        f"could not read data file {empty}: it holds no JSON records; data.format='e2e' needs"
    )


def test_a_json_array_loads_as_json_lines_do_and_a_broken_one_names_its_line(tmp_path, tokenizer):
    records = [{"mr": mr, "ref": ref} for mr, ref in tf.e2e_rows()[:12]]
    lines = build_splits(
        config(write(tmp_path / "a.jsonl", jsonl(tf.e2e_rows()[:12]))), tokenizer, seed=0
    )
    array = build_splits(
        config(write(tmp_path / "a.json", json.dumps(records, indent=1))), tokenizer, seed=0
    )
    assert [e.ids_L.tolist() for e in array.train] == [e.ids_L.tolist() for e in lines.train]
    broken = write(tmp_path / "b.json", json.dumps(records, indent=1)[:-30])
    assert error(config(broken), tokenizer).startswith(f"data file {broken}, line ")


# --- a 10 MB field ---------------------------------------------------------------------------


class SpyTokenizer:
    """The tokenizer, recording the longest text each encode_batch call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode_batch(self, texts, **kwargs):
        self.longest.append(max(map(len, texts), default=0))
        return self.tokenizer.encode_batch(texts, **kwargs)


def test_a_10mb_field_is_cut_before_tokenising_and_counted(tmp_path, tokenizer):
    long_ref = "Zizzi serves Italian food. " * 400_000  # 10.8 MB
    path = write(tmp_path / "long.csv", HEADER + GOOD + f'"name[Zizzi], food[Long]","{long_ref}"\n')
    spy = SpyTokenizer(tokenizer)
    cfg = config(path)
    splits = build_splits(cfg, spy, seed=0)
    limit = char_limit(tokenizer, cfg.max_length)
    assert max(spy.longest) <= limit < len(long_ref) // 100
    report = splits.report
    assert (report.cut, report.truncated, report.skipped, len(splits.train)) == (1, 1, {}, 13)
    assert "1 with a text far longer than data.max_length cut before tokenising" in report.summary()
    # the kept tokens are those of the whole text
    example = max(splits.train, key=lambda e: len(e.ids_L))
    assert len(example.ids_L) == cfg.max_length
    target = example.ids_L[example.prompt_length :].tolist()
    assert (
        target == tokenizer.encode(long_ref[:20_000], add_special_tokens=False).ids[: len(target)]
    )
    too_long = error(dataclasses.replace(cfg, on_too_long="error"), tokenizer)
    assert "(line 14 of the file): prompt + target + EOS is at least" in too_long


# --- the CLI: one line, exit code 2 ----------------------------------------------------------


def test_the_cli_prints_a_data_error_as_one_line(tmp_path, capsys):
    csv = write(tmp_path / "bad.csv", HEADER + '"name[A]","A is.","surplus"\n' + GOOD)
    cfg = tf.tiny_config(
        tf.write_tiny_llama(tmp_path / "model"), csv, tmp_path / "run", "data.on_malformed=error"
    )
    assert main(["train", str(save_config(cfg, tmp_path / "run.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lora-jax train: error: data file {csv}, line 2: the row has 3 fields but the "
        f"header has 2 (mr,ref); quote a field that holds a comma, or remove the extra "
        f"field; fix the file or set data.on_malformed=skip"
    )


# --- LoRA targets, checked before the weights load -------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama with its weights file replaced by garbage: only its config can be read."""
    directory = tf.write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    return directory


@pytest.fixture
def no_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("check_targets loaded the model")

    monkeypatch.setattr(models, "load", load)


def lora(model_dir, tmp_path, *overrides):
    return tf.tiny_config(model_dir, tmp_path / "d.csv", tmp_path / "run", *overrides)


def check_error(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        check_targets(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_valid_targets_pass_without_loading_the_weights(model_dir, tmp_path, no_load):
    check_targets(lora(model_dir, tmp_path))
    check_targets(
        lora(
            model_dir,
            tmp_path,
            "lora.targets=[q_proj, '^layers_1/mlp/.*']",
            "lora.rank_pattern={q_proj: 2}",
            "lora.alpha_pattern={'layers_1/.*': 4}",
        )
    )
    check_targets(
        lora(
            model_dir,
            tmp_path,
            "model.scan_layers=true",
            "lora.targets=['^layers/self_attn/q_proj/kernel']",
        )
    )
    check_targets(lora(model_dir, tmp_path, "method=full", "lora.targets=['(']"))  # not LoRA


def test_an_invalid_target_regex_is_a_config_error(model_dir, tmp_path, no_load):
    assert check_error(lora(model_dir, tmp_path, "lora.targets=[v_proj, 'q_proj(']")) == (
        "lora.targets: 'q_proj(' is not a valid regex (missing ), unterminated subpattern at "
        "position 6); give a regex over parameter paths, e.g. "
        "lora.targets=['.*/(q_proj|v_proj)/kernel']"
    )
    assert check_error(lora(model_dir, tmp_path, "lora.rank_pattern={'q[': 2}")).startswith(
        "lora.rank_pattern: 'q[' is not a valid regex (unterminated character set"
    )


def test_a_target_matching_no_weight_names_the_model_s_weights(model_dir, tmp_path, no_load):
    message = check_error(lora(model_dir, tmp_path, "lora.targets=[q_proj, '.*/(q|v)_prj/k']"))
    assert message.startswith(
        f"lora.targets: '.*/(q|v)_prj/k' matches no weight of model "
        f"'{model_dir}'; the regex is searched in slash-joined parameter "
        f"paths"
    )
    assert "layers_0/self_attn/q_proj/kernel" in message and "every layers_N alike" in message
    # a norm scale is not a weight; with scan_layers the paths have no layer number
    assert "'norm/scale' matches no weight" in check_error(
        lora(model_dir, tmp_path, "lora.targets=['norm/scale']")
    )
    scanned = check_error(
        lora(
            model_dir,
            tmp_path,
            "model.scan_layers=true",
            "lora.targets=['layers_0/self_attn/q_proj']",
        )
    )
    assert "layers/self_attn/q_proj/kernel" in scanned


def test_a_rank_pattern_key_matching_no_adapted_weight_or_a_rank_too_large(
    model_dir, tmp_path, no_load
):
    assert check_error(lora(model_dir, tmp_path, "lora.rank_pattern={o_proj: 2}")) == (
        "lora.rank_pattern: key 'o_proj' matches none of the weights that lora.targets adapts "
        "(layers_0/self_attn/q_proj/kernel, layers_0/self_attn/v_proj/kernel (every layers_N "
        "alike)); a key matches a whole path or its trailing segments, e.g. 'q_proj'"
    )
    assert check_error(lora(model_dir, tmp_path, "lora.rank=64")).startswith(
        "lora: layers_0/self_attn/q_proj/kernel: rank 64 exceeds min(fan_in, fan_out)"
    )


@pytest.mark.parametrize(
    "options", [{}, {"scan_layers": True}, {"attention_bias": True, "mlp_bias": True}]
)
def test_abstract_load_has_the_shapes_of_load(tmp_path, options):
    directory = tf.write_tiny_llama(tmp_path / "model")
    _, params, _ = models.load(directory, **options)
    model, shapes = models.abstract_load(directory, **options)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert jax.tree.leaves(
        jax.tree.map(lambda s, p: (s.shape, s.dtype) == (p.shape, p.dtype), shapes, params)
    )
    assert model.config.scan_layers == bool(options.get("scan_layers"))


def test_abstract_load_reads_the_embedded_model_s_config():
    model, shapes = models.abstract_load("smollm2-135m", scan_layers=True)
    assert models.with_options(model.config, scan_layers=False, norm_eps=1e-5) == models.get_config(
        "smollm2-135m"
    )
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 134_515_008


def test_gguf_metadata_is_read_as_gguf_reader_reads_it(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in {
        "block_count": 2,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "context_length": 128,
    }.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float64("llama.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_int32("tokenizer.ggml.eos_token_id", 2)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "é", "a b"] * 3)
    writer.add_array("tokenizer.ggml.token_type", [1, 3, 1, 1] * 3)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 0.0, 2.0] * 3)
    for name, shape in [
        ("token_embd.weight", (12, 32)),
        ("output.weight", (12, 32)),
        ("blk.0.attn_norm.weight", (32,)),
    ]:
        writer.add_tensor(name, np.ones(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata, infos = read_metadata(path)
    reader = gguf.GGUFReader(path)
    assert (
        list(infos)
        == [t.name for t in reader.tensors]
        == ["token_embd.weight", "output.weight", "blk.0.attn_norm.weight"]
    )
    assert metadata == {k: field(reader, k) for k in reader.fields if not k.startswith("GGUF.")}
    assert config_from_gguf(metadata, True) == config_from_gguf(reader, True)
    assert metadata["tokenizer.ggml.tokens"][2:4] == ["é", "a b"]
    # each tensor's data is where GGUFReader finds it
    for t in reader.tensors:
        assert infos[t.name].offset == t.data_offset
        np.testing.assert_array_equal(read_f32(path, infos[t.name]), np.asarray(t.data))
