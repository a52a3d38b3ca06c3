"""train/data.py and friends: formatting, target-only loss mask, grouped split, shuffling,
padding/packing, per-process shards, malformed rows, exact resume."""

import dataclasses
import json
from collections import Counter

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.batching import START, DataPosition, TrainBatches, assemble, eval_batches
from train.config import DataConfig
from train.data import DataError, build_splits, train_batches, validation_batches
from train.examples import Example
from train.formats import E2E_INSTRUCTION, MalformedRow, chatml_user_turn, text_field
from train.ordering import epoch_permutation, split_by_group

from train_fixtures import REPO_ROOT

E2E_DEVSET = REPO_ROOT.parent / "shared/data/e2e/devset.csv"
EOS = "<|im_end|>"

ROWS = [  # (mr, ref); several refs per MR, as in E2E
    ("name[Alimentum], area[city centre]", "Alimentum is in the city centre."),
    ("name[Alimentum], area[city centre]", "In the city centre there is Alimentum."),
    ("name[Café Rouge], priceRange[£20-25]", "Café Rouge costs £20-25."),
    ("name[Café Rouge], priceRange[£20-25]", "For £20-25 you can eat at Café Rouge."),
    ("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
    ("name[The Vaults], eatType[pub]", "A pub called The Vaults."),
    ("name[Zizzi], food[Italian]", "Zizzi serves Italian food."),
    ("name[Zizzi], food[Italian]", "Italian food is served at Zizzi."),
    ("name[Wildwood], near[Ranch]", "Wildwood is near Ranch."),
    ("name[Wildwood], near[Ranch]", "Near Ranch is Wildwood."),
    ("name[Loch Fyne], food[Japanese]", "Loch Fyne offers Japanese food."),
    ("name[Loch Fyne], food[Japanese]", "Japanese food at Loch Fyne."),
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (exact decoding of any text) with the ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([f"{mr} {ref}" for mr, ref in ROWS] * 3, trainer)
    return tok


def write_csv(path, rows, columns=("mr", "ref")):
    datasets.Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(columns)}).to_csv(
        str(path), index=False
    )
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def decode(tokenizer, ids):
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def segments(batch, r):
    """[(ids, loss_mask, positions), ...] for the segments of row r, in order."""
    seg = batch["segment_ids"][r]
    return [
        tuple(batch[k][r][seg == s] for k in ("input_ids", "loss_mask", "positions"))
        for s in range(1, seg.max() + 1)
    ]


def one_epoch(stream):
    """Every batch of the stream's current epoch."""
    epoch, batches = stream.position.epoch, []
    while stream.position.epoch == epoch:
        batches.append(next(stream))
    return batches


def synthetic(n, length=5, prompt_length=2):
    """n examples whose first token (100 + i) identifies them."""
    return [
        Example(np.array([100 + i] + list(range(1, length)), np.int32), prompt_length)
        for i in range(n)
    ]


def first_tokens(batch):
    return batch["input_ids"][:, 0].tolist()


# --- formatting and the target-only loss mask --------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_loss_mask_covers_exactly_the_target_tokens(tmp_path, tokenizer, packing):
    cfg = DataConfig(
        eos_token=EOS,
        path=write_csv(tmp_path / "e2e.csv", ROWS),
        validation_fraction=0.0,
        max_length=128,
        batch_size=2,
        packing=packing,
    )
    splits = build_splits(cfg, tokenizer, seed=0)
    seen = Counter()
    for batch in one_epoch(train_batches(splits, cfg, seed=0)):
        for r in range(len(batch["input_ids"])):
            for ids, mask, _ in segments(batch, r):
                target = decode(tokenizer, ids[mask == 1])
                assert target.endswith(EOS)
                seen[(decode(tokenizer, ids[mask == 0]), target)] += 1
    rows_used = Counter((chatml_user_turn(E2E_INSTRUCTION + mr), ref + EOS) for mr, ref in ROWS)
    assert seen <= rows_used and (packing or seen == rows_used)


def test_e2e_prompt_is_chatml():
    assert chatml_user_turn("x") == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "value, reason",
    [(None, "missing"), (float("nan"), "missing"), (5, "not_string"), ("  ", "empty")],
)
def test_text_field_rejects_bad_values(value, reason):
    with pytest.raises(MalformedRow) as e:
        text_field({"ref": value}, "ref")
    assert e.value.reason == reason and "'ref'" in str(e.value)


def test_local_formats_load_alike(tmp_path, tokenizer):
    records = [{"mr": mr, "ref": ref} for mr, ref in ROWS]
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"))
    paths = [
        write_csv(tmp_path / "d.csv", ROWS),
        write_jsonl(tmp_path / "d.jsonl", records),
        str(tmp_path / "d.parquet"),
    ]
    built = [
        build_splits(DataConfig(eos_token=EOS, path=p, validation_fraction=0.25), tokenizer, seed=1)
        for p in paths
    ]
    for other in built[1:]:
        assert [e.ids_L.tolist() for e in other.train] == [e.ids_L.tolist() for e in built[0].train]


def test_e2e_columns_are_found_under_their_other_names(tmp_path, tokenizer):
    """Hugging Face e2e_nlg's names, other case and a byte-order mark train as mr/ref do."""
    records = [{"mr": mr, "ref": ref} for mr, ref in ROWS]
    renamed = [
        {"\ufeffMeaning_Representation": r["mr"], " human_reference": r["ref"], "extra": 1}
        for r in records
    ]
    built = [
        build_splits(
            DataConfig(
                eos_token=EOS, path=write_jsonl(tmp_path / name, rows), validation_fraction=0.25
            ),
            tokenizer,
            seed=1,
        )
        for name, rows in (("a.jsonl", records), ("b.jsonl", renamed))
    ]
    for split in ("train", "validation"):
        assert [e.ids_L.tolist() for e in getattr(built[1], split)] == [
            e.ids_L.tolist() for e in getattr(built[0], split)
        ]


# --- the real E2E file: grouped split ------------------------------------------------------


def test_real_e2e_split_by_mr_has_no_leakage_and_is_deterministic(tokenizer):
    cfg = DataConfig(path=str(E2E_DEVSET), max_length=1024, eos_token="<|im_end|>")
    assert E2E_DEVSET.is_file(), f"{E2E_DEVSET} is needed for this test"
    splits = build_splits(cfg, tokenizer, seed=0)
    report = splits.report
    assert report.rows == 4672 and report.skipped == {} and report.truncated == 0
    assert report.train_groups + report.validation_groups == 547
    assert report.validation_groups == round(0.1 * 547)
    prompts = [
        {e.ids_L[: e.prompt_length].tobytes() for e in part}
        for part in (splits.train, splits.validation)
    ]
    assert not prompts[0] & prompts[1]  # the prompt is a function of the MR
    assert [len(p) for p in prompts] == [report.train_groups, report.validation_groups]
    again = build_splits(cfg, tokenizer, seed=0)
    assert [e.ids_L.tobytes() for e in again.validation] == [
        e.ids_L.tobytes() for e in splits.validation
    ]


def test_split_by_group_keeps_groups_whole_and_depends_on_seed():
    groups = [f"g{i % 40}" for i in range(400)]
    train, val = split_by_group(groups, 0.25, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(400))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert len({groups[i] for i in val}) == 10
    assert np.array_equal(val, split_by_group(groups, 0.25, seed=3)[1])
    assert not np.array_equal(val, split_by_group(groups, 0.25, seed=4)[1])


# --- shuffling, sharding, packing, resume ---------------------------------------------------


def test_shuffle_is_deterministic_per_seed_and_epoch_and_covers_each_epoch():
    examples = synthetic(24)

    def make(seed):
        return TrainBatches(
            examples, batch_size=4, max_length=8, pad_id=0, packing=False, seed=seed
        )

    a, b = make(0), make(0)
    epoch0, epoch1 = one_epoch(a), one_epoch(a)
    order0 = [t for batch in epoch0 for t in first_tokens(batch)]
    order1 = [t for batch in epoch1 for t in first_tokens(batch)]
    assert sorted(order0) == sorted(order1) == list(range(100, 124))
    assert order0 != order1
    assert [first_tokens(x) for x in one_epoch(b)] == [first_tokens(x) for x in epoch0]
    assert [t for batch in one_epoch(make(1)) for t in first_tokens(batch)] != order0
    assert np.array_equal(epoch_permutation(24, 0, 1), epoch_permutation(24, 0, 1))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(packing, process_count):
    examples = [
        Example(np.arange(100 + i, 100 + i + 3 + i % 5, dtype=np.int32), 1) for i in range(40)
    ]

    def make(p, n):
        return TrainBatches(
            examples,
            batch_size=8,
            max_length=12,
            pad_id=0,
            packing=packing,
            seed=5,
            process_index=p,
            process_count=n,
        )

    whole = make(0, 1)
    shards = [make(p, process_count) for p in range(process_count)]
    for _ in range(2 * whole.steps_in_epoch(0) + 1):  # across epoch boundaries
        global_batch = next(whole)
        parts = [next(s) for s in shards]
        assert all(p["input_ids"].shape == (8 // process_count, 12) for p in parts)
        for key, value in global_batch.items():
            assert np.array_equal(np.concatenate([p[key] for p in parts]), value)
    with pytest.raises(ValueError, match="multiple"):
        make(0, 3)


def test_eval_batches_keep_every_example_and_shard():
    examples = synthetic(10)
    full = list(eval_batches(examples, batch_size=4, max_length=6, pad_id=0))
    assert len(full) == 3
    tokens = [
        t for b in full for t, s in zip(first_tokens(b), b["segment_ids"][:, 0], strict=True) if s
    ]
    assert tokens == list(range(100, 110))
    assert full[-1]["loss_mask"][2:].sum() == 0  # the two filler rows
    halves = [
        list(
            eval_batches(
                examples,
                batch_size=4,
                max_length=6,
                pad_id=0,
                process_index=p,
                process_count=2,
                num_batches=2,
            )
        )
        for p in (0, 1)
    ]
    for step in range(2):
        assert np.array_equal(
            np.concatenate([h[step]["input_ids"] for h in halves]), full[step]["input_ids"]
        )


def test_packing_preserves_targets_and_segments_never_see_each_other():
    rng = np.random.default_rng(0)
    examples = [
        Example(rng.integers(3, 1000, n).astype(np.int32), int(rng.integers(1, n)))
        for n in rng.integers(3, 20, 60)
    ]
    stream = TrainBatches(examples, batch_size=4, max_length=32, pad_id=0, packing=True, seed=2)
    rows = stream.epoch_rows(0)
    assert sorted(i for row in rows for i in row) == list(range(60))  # each example once
    batches = one_epoch(stream)
    assert len(batches) == len(rows) // 4
    for step, batch in enumerate(batches):
        seg_BxL = batch["segment_ids"]
        for r, row in enumerate(rows[step * 4 : (step + 1) * 4]):
            assert len(segments(batch, r)) == len(row) > 0
            for (ids, mask, pos), i in zip(segments(batch, r), row, strict=True):
                ex = examples[i]
                assert np.array_equal(ids, ex.ids_L)
                assert np.array_equal(pos, np.arange(len(ex.ids_L)))
                assert np.array_equal(ids[mask == 1], ex.ids_L[ex.prompt_length :])
            # causal attention within a segment: q sees k iff same nonzero segment and k <= q
            same_LxL = (seg_BxL[r][:, None] == seg_BxL[r][None, :]) & (seg_BxL[r][:, None] > 0)
            allowed_LxL = same_LxL & np.tri(32, dtype=bool)
            for q in np.flatnonzero(seg_BxL[r]):
                keys = np.flatnonzero(allowed_LxL[q])
                assert np.all(seg_BxL[r][keys] == seg_BxL[r][q])
                assert len(keys) == batch["positions"][r, q] + 1
        # every loss term (predict t from t-1) stays inside one segment
        b, t = np.nonzero(batch["loss_mask"])
        assert np.all(t > 0) and np.all(seg_BxL[b, t - 1] == seg_BxL[b, t])


@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_a_saved_position_yields_the_same_batches(packing):
    examples = [Example(np.arange(100 + i, 104 + i + i % 3, dtype=np.int32), 2) for i in range(30)]

    def make(position=START):
        return TrainBatches(
            examples,
            batch_size=4,
            max_length=16,
            pad_id=0,
            packing=packing,
            seed=9,
            process_index=1,
            process_count=2,
            position=position,
        )

    straight = make()
    for _ in range(5):
        next(straight)
    saved = json.dumps(straight.position.to_dict())
    expected = [next(straight) for _ in range(3 * straight.steps_in_epoch(0))]  # several epochs
    resumed = make(DataPosition.from_dict(json.loads(saved)))
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert resumed.position == straight.position
    with pytest.raises(ValueError, match="outside epoch"):
        make(DataPosition(epoch=0, step=10_000))


def test_assemble_pads_and_rejects_overfull_rows():
    ex = Example(np.array([5, 6, 7], np.int32), 1)
    batch = assemble([[ex], []], max_length=4, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [2, 2, 2, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="max_length"):
        assemble([[ex, ex]], max_length=5, pad_id=2)


# --- bad input -------------------------------------------------------------------------


BAD_RECORDS = [
    {"mr": "name[A]", "ref": "A is fine."},
    {"mr": "name[B]", "ref": None},  # missing
    {"mr": "", "ref": "Empty MR."},  # empty
    {"mr": "name[C]"},  # no ref key at all: missing
    {"mr": "name[D]", "ref": "D is fine."},
]


def test_malformed_rows_are_skipped_and_counted(tmp_path, tokenizer):
    cfg = DataConfig(
        eos_token=EOS,
        path=write_jsonl(tmp_path / "bad.jsonl", BAD_RECORDS),
        validation_fraction=0.0,
    )
    splits = build_splits(cfg, tokenizer, seed=0)
    assert splits.report.skipped == {"missing": 2, "empty": 1}
    assert len(splits.train) == 2
    assert "3 skipped" in splits.report.summary()


def test_malformed_rows_raise_naming_the_row(tmp_path, tokenizer):
    cfg = DataConfig(
        eos_token=EOS, path=write_jsonl(tmp_path / "bad.jsonl", BAD_RECORDS), on_malformed="error"
    )
    with pytest.raises(DataError, match=r"row 1 of .*column 'ref' is missing.*on_malformed=skip"):
        build_splits(cfg, tokenizer, seed=0)


def test_length_rules(tmp_path, tokenizer):
    rows = ROWS[:4] + [(ROWS[0][0], "Alimentum is in the city centre. " * 6)]
    path = write_csv(tmp_path / "long.csv", rows)

    def n_tokens(text):
        return len(tokenizer.encode(text, add_special_tokens=False))

    lengths = [
        (n_tokens(chatml_user_turn(E2E_INSTRUCTION + mr)), n_tokens(ref) + 1) for mr, ref in rows
    ]
    max_length = max(p + t for p, t in lengths[:4])
    assert sum(lengths[4]) > max_length
    base = DataConfig(eos_token=EOS, path=path, validation_fraction=0.0, max_length=max_length)
    truncated = build_splits(base, tokenizer, seed=0)
    assert truncated.report.truncated == 1 and len(truncated.train) == 5
    assert max(len(e.ids_L) for e in truncated.train) == max_length
    skipped = build_splits(dataclasses.replace(base, on_too_long="skip"), tokenizer, seed=0)
    assert skipped.report.skipped == {"too_long": 1} and len(skipped.train) == 4
    with pytest.raises(DataError, match="row 4 .* more than data.max_length"):
        build_splits(dataclasses.replace(base, on_too_long="error"), tokenizer, seed=0)
    short = dataclasses.replace(base, max_length=min(p for p, _ in lengths))
    with pytest.raises(DataError, match="all 5 rows .* were skipped"):
        build_splits(short, tokenizer, seed=0)
    with pytest.raises(DataError, match="row 0 .* no room for a target"):
        build_splits(dataclasses.replace(short, on_malformed="error"), tokenizer, seed=0)


@pytest.mark.parametrize(
    "records, match",
    [
        ([{"meaning": "x", "ref": "y"}], r"lacks columns \['mr'\]"),
        ([{"mr": "only one MR", "ref": "y"}], "single group"),
    ],
)
def test_unusable_tables_are_errors(tmp_path, tokenizer, records, match):
    with pytest.raises(DataError, match=match):
        build_splits(
            DataConfig(eos_token=EOS, path=write_jsonl(tmp_path / "t.jsonl", records)),
            tokenizer,
            seed=0,
        )


def test_empty_table_is_an_error(tmp_path, tokenizer):
    (tmp_path / "empty.csv").write_text("mr,ref\n")
    with pytest.raises(DataError, match="could not read data file .*empty.csv"):
        build_splits(DataConfig(eos_token=EOS, path=str(tmp_path / "empty.csv")), tokenizer, seed=0)


def test_missing_file_and_missing_eos_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"does not exist .*current directory.*data.path="):
        build_splits(DataConfig(eos_token=EOS, path=str(tmp_path / "nope.csv")), tokenizer, seed=0)
    with pytest.raises(DataError, match="data.eos_token"):
        build_splits(DataConfig(eos_token="</s>"), tokenizer, seed=0)
    csv = write_csv(tmp_path / "e2e.csv", ROWS)
    with pytest.raises(DataError, match="names no EOS token .*set data.eos_token"):
        build_splits(DataConfig(path=csv), tokenizer, seed=0)  # no model EOS to fall back on
    eos = tokenizer.token_to_id(EOS)  # the model's EOS, when data.eos_token is unset
    unset, named = (
        build_splits(DataConfig(path=csv, eos_token=e), tokenizer, 0, eos) for e in (None, EOS)
    )
    assert unset.pad_id == named.pad_id == eos
    for a, b in zip(unset.train, named.train, strict=True):
        np.testing.assert_array_equal(a.ids_L, b.ids_L)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        build_splits(DataConfig(eos_token=EOS, path=str(tmp_path / "notes.txt")), tokenizer, seed=0)


def test_text_format_trains_on_every_token_but_the_first(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ref} for _, ref in ROWS])
    cfg = DataConfig(
        eos_token=EOS, path=path, format="text", validation_fraction=0.25, batch_size=3
    )
    splits = build_splits(cfg, tokenizer, seed=0)
    assert splits.report.train_groups == 9 and splits.report.validation_groups == 3
    batch = next(iter(validation_batches(splits, cfg)))
    for r in range(3):
        ((ids, mask, _),) = segments(batch, r)
        assert mask.tolist() == [0] + [1] * (len(ids) - 1)


def test_a_name_without_a_file_extension_is_a_hub_data_set(monkeypatch, tokenizer):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    with pytest.raises(DataError, match="could not load data set 'someone/e2e' .* from the hub"):
        build_splits(DataConfig(eos_token=EOS, path="someone/e2e"), tokenizer, seed=0)
