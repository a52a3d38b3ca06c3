"""studies/e2e/metrics.py, studies/e2e/wordnet.py and ``lora-jax eval`` (studies/e2e/evaluation.py).

Metric expectations are independent of the implementations: a hand-computed BLEU,
hand-computed NIST cases and one computed by mteval-v13a.pl itself, maxima for perfect
outputs, zeros for empty ones, and the multi-reference rules (a duplicated reference
changes nothing, a matching extra reference raises the score). The command runs
on a tiny model trained for a few steps.
"""

from __future__ import annotations

import json
import math

import pytest

import lora_jax as lj
from studies.e2e import evaluation as e2e_eval
from studies.e2e import metrics as e2e_metrics
from studies.e2e.wordnet import wordnet
from train.adapter import save_adapter
from train.cli import main
from train.config import config_to_yaml
from train.data import DataError
from train.export import load_adapted

import train_fixtures as tf

REFS = [
    ["The Eagle is a cheap pub near the river."],
    ["Zizzi serves Italian food in the city centre."],
    ["Aromi is a family friendly coffee shop."],
]
OUTPUTS = [refs[0] for refs in REFS]


pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def test_bleu_matches_a_hand_computed_case():
    # 1- to 4-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert e2e_metrics.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == (
        pytest.approx(expected, abs=1e-9)
    )
    assert e2e_metrics.bleu(["The CAT sat on the mat"], [["the cat sat on a mat"]]) == (
        pytest.approx(expected, abs=1e-9)
    )  # case-insensitive, as mteval-v13a


def test_nist_of_an_output_equal_to_its_only_reference():
    # Reference counts: "the" 2 of 6 words, the other words 1; info(w) = log2(6 / count(w)).
    # Bigrams: info("the cat") = info("the mat") = log2(count(the) / 1) = 1, the other
    # bigrams and all longer n-grams have info log2(1 / 1) = 0. Equal lengths: no penalty.
    expected = (2 * math.log2(6 / 2) + 4 * math.log2(6)) / 6 + (1 + 1) / 5
    assert e2e_metrics.nist(["The CAT sat on the mat"], [["the cat sat on the mat"]]) == (
        pytest.approx(expected, abs=1e-12)
    )
    assert e2e_metrics.nist(["dog barks loudly"], [["the cat sat on the mat"]]) == 0


def test_nist_clips_against_the_max_count_over_the_references():
    # "a" occurs once in each reference: it counts once (the max), not twice (the sum);
    # "b" and "c" match in different references, so both count (no single best reference).
    # Reference words 8: info(a) = log2(8 / 2), info(b) = info(c) = log2(8 / 1); of the
    # hypothesis bigrams only "a b" matches, info log2(count(a) / count(a b)) = log2(2 / 1).
    # Reference length 8 words / 2 references = 4 = the hypothesis length: no penalty.
    expected = (math.log2(4) + 2 * math.log2(8)) / 4 + math.log2(2) / 3
    assert e2e_metrics.nist(["a a b c"], [["a c x y", "a b x y"]]) == (
        pytest.approx(expected, abs=1e-12)
    )


def test_nist_penalty_halves_the_score_at_two_thirds_of_the_mean_reference_length():
    # One output: reference length (3 + 6) / 2 = 4.5, 3 hypothesis words, ratio 2/3
    # (the closest reference, 3 words, would give no penalty). Reference words 9, "a",
    # "b", "c" twice each: info log2(9 / 2); "a b", "b c", "a b c" have info log2(2 / 2) = 0.
    assert e2e_metrics.nist(["a b c"], [["a b c", "a b c d e f"]]) == (
        pytest.approx(0.5 * math.log2(9 / 2), abs=1e-12)
    )
    # Two outputs with 1 and 3 references: all 12 reference words / the mean of 2
    # references per output = 6 (the sum of the per-output means would be 2 + 10/3), so
    # 4 hypothesis words are 2/3 of it. info(a) = info(b) = log2(12), info(c) = info(d) =
    # log2(12 / 3); "a b" and "c d" have info 0.
    expected = 0.5 * (2 * math.log2(12) + 2 * math.log2(4)) / 4
    assert e2e_metrics.nist(["a b", "c d"], [["a b"], ["c d", "c d", "c d e f g h"]]) == (
        pytest.approx(expected, abs=1e-12)
    )


def test_nist_matches_mteval_v13a():
    # Expected value from mteval-v13a.pl ("version 13a", the mteval/mteval-v13a-sig.pl of
    # tuetschek/e2e-metrics at fdfe692), run as e2e-metrics' measure_scores.py runs it:
    # perl mteval-v13a-sig.pl -r ref.sgm -s src.sgm -t tst.sgm -f log.txt, the SGML files
    # written by its create_mteval_file; it prints "NIST score = 5.7126", and with its
    # final printf's %2.4f changed to %.12f, 5.712621797312. "0" is there on purpose:
    # Perl reads the n-gram prefix "0" as false and takes the total word count instead.
    hypotheses = [
        "The Eagle is a cheap pub near the river.",
        "Zizzi serves Italian food.",
        "Aromi is a coffee shop for families.",
        "The Wrestlers has a 0 out of 5 rating.",
        "Near the city centre, Cotto is cheap.",
    ]
    references = [
        ["The Eagle is a cheap pub by the river.", "Near the river, The Eagle pub is cheap."],
        ["Zizzi serves Italian food in the city centre."],
        [
            "Aromi is a family friendly coffee shop.",
            "Aromi, a coffee shop, welcomes families.",
            "Families are welcome at the Aromi coffee shop.",
        ],
        [
            "The Wrestlers is rated 0 out of 5.",
            "The Wrestlers has a customer rating of 0 out of 5 and is cheap.",
        ],
        [
            "Cotto is a cheap restaurant in the city centre.",
            "In the city centre, Cotto offers cheap food.",
            "Cotto is cheap.",
            "Cotto, in the city centre, is cheap.",
        ],
    ]
    assert e2e_metrics.nist(hypotheses, references) == pytest.approx(5.712621797312, abs=1e-9)


def test_perfect_outputs_score_the_maximum_and_empty_outputs_zero():
    perfect = e2e_metrics.score(OUTPUTS, REFS)
    assert perfect["BLEU"] == pytest.approx(100)
    assert perfect["ROUGE_L"] == pytest.approx(1)
    assert perfect["CIDEr"] == pytest.approx(10)  # CIDEr-D's x10 scale
    empty = e2e_metrics.score([""] * len(REFS), REFS)
    assert all(value == 0 for value in empty.values() if value is not None)
    assert perfect["NIST"] > e2e_metrics.nist(["The Eagle is a pub."] * 3, REFS) > 0


def test_a_duplicated_reference_changes_no_score():
    outputs = [
        "The Eagle is a pub by the river.",
        "Zizzi has Italian food.",
        "Aromi is a coffee shop for families.",
    ]
    assert e2e_metrics.score(outputs, [refs * 2 for refs in REFS]) == pytest.approx(
        e2e_metrics.score(outputs, REFS)
    )


def test_a_matching_extra_reference_raises_every_score():
    outputs = [
        "Near the river, The Eagle pub is cheap.",
        "Zizzi has Italian food downtown.",
        "Aromi, a coffee shop, welcomes families.",
    ]
    alone = e2e_metrics.score(outputs, REFS)
    more = e2e_metrics.score(outputs, [refs + [out] for refs, out in zip(REFS, outputs)])
    for name in e2e_metrics.METRICS:
        if alone[name] is not None:
            assert more[name] > alone[name], name


def test_meteor_matches_wordnet_synonyms():
    if wordnet() is None:
        pytest.skip("no WordNet (apt-get install wordnet-base); METEOR is reported as null")
    synonym = e2e_metrics.meteor(["the eagle serves nutrient"], [["The Eagle serves food."]])
    other = e2e_metrics.meteor(["the eagle serves bricks"], [["The Eagle serves food."]])
    assert synonym > other


def test_meteor_is_null_with_a_note_without_wordnet(monkeypatch):
    monkeypatch.setattr(e2e_metrics, "wordnet", lambda: None)
    scores = e2e_metrics.score(OUTPUTS, REFS)
    assert scores["METEOR"] is None and scores["BLEU"] == pytest.approx(100)
    assert "wordnet-base" in e2e_metrics.notes(scores)[0]


def test_read_e2e_groups_references_by_mr_in_order_of_first_appearance(tmp_path):
    rows = [("b", "b1"), ("a", "a1"), ("b", "b2"), ("c", "c1"), ("a", "a2")]
    assert e2e_eval.read_e2e(tf.write_csv(tmp_path / "d.csv", rows)) == [
        ("b", ["b1", "b2"]),
        ("a", ["a1", "a2"]),
        ("c", ["c1"]),
    ]


@pytest.mark.parametrize(
    "header", ["\ufeffMR,ref,fixed", "meaning_representation,human_reference", "ref, mr"]
)
def test_read_e2e_finds_the_columns_under_their_other_names(tmp_path, header):
    """A byte-order mark, other case, other order and the HF e2e_nlg names all read the same."""
    columns = [c.lstrip("\ufeff").strip().lower() for c in header.split(",")]
    cells = {
        "mr": "name[A]",
        "meaning_representation": "name[A]",
        "ref": "A is.",
        "human_reference": "A is.",
        "fixed": "0",
    }
    (tmp_path / "d.csv").write_text(
        header + "\n" + ",".join(f'"{cells[c]}"' for c in columns) + "\n", encoding="utf-8"
    )
    assert e2e_eval.read_e2e(tmp_path / "d.csv") == [("name[A]", ["A is."])]


def test_bad_data_is_an_error_naming_the_problem(tmp_path):
    (tmp_path / "cols.csv").write_text("mr,text\nx,y\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['ref'\]"):
        e2e_eval.read_e2e(tmp_path / "cols.csv")
    (tmp_path / "row.csv").write_text('mr,ref\n"a","b"\n"c",\n')
    with pytest.raises(DataError, match="row 1 of .*column 'ref' is missing"):
        e2e_eval.read_e2e(tmp_path / "row.csv")
    with pytest.raises(DataError, match="does not exist"):
        e2e_eval.read_e2e(tmp_path / "none.csv")


def test_eval_writes_predictions_in_mr_order_and_the_fixed_score_files(tmp_path, monkeypatch):
    rows = [
        ("b", "b is a fine place"),
        ("a", "a is a fine place"),
        ("b", "b is fine"),
        ("c", "c is a fine place"),
    ]
    csv = tf.write_csv(tmp_path / "d.csv", rows)
    fake = e2e_eval.Target(None, None, None, "<eos>", "an echo of each MR")
    monkeypatch.setattr(e2e_eval, "load_target", lambda target: fake)
    monkeypatch.setattr(
        e2e_eval, "decode", lambda target, mrs, *a: [f"{mr} is a fine place" for mr in mrs]
    )
    assert main(["eval", "any", "--data", str(csv), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "predictions.txt").read_text() == (
        "b is a fine place\na is a fine place\nc is a fine place\n"
    )
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores["BLEU"] == pytest.approx(100)
    assert "| BLEU | 100.0000 | 100.0000 |" in (tmp_path / "out" / "scores.md").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config file, run directory, CSV) of a tiny LoRA run."""
    root = tmp_path_factory.mktemp("e2e_eval")
    config = root / "tiny.yaml"
    config.write_text(
        config_to_yaml(
            tf.tiny_config(
                tf.write_tiny_llama(root / "model"), tf.write_csv(root / "e2e.csv"), root / "run"
            )
        )
    )
    assert main(["train", str(config)]) == 0
    return config, root / "run", root / "e2e.csv"


def test_unmerged_adapter_and_merged_model_decode_identically(trained, tmp_path):
    config, run_dir, csv = trained
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    quick = ["--data", str(csv), "--num-beams", "2", "--max-new-tokens", "10", "--batch-size", "4"]
    for name, target in [
        ("unmerged", run_dir / "adapter"),
        ("merged", tmp_path / "merged"),
        ("base", config),
    ]:
        assert main(["eval", str(target), *quick, "--out", str(tmp_path / f"eval_{name}")]) == 0
    predictions = {
        name: (tmp_path / f"eval_{name}" / "predictions.txt").read_text().splitlines()
        for name in ("unmerged", "merged", "base")
    }
    assert len(predictions["unmerged"]) == len(predictions["base"]) == 16
    assert predictions["unmerged"] == predictions["merged"]


def test_eval_greedy_limit_and_errors(trained, tmp_path, capsys):
    _, run_dir, csv = trained
    assert (
        main(
            [
                "eval",
                str(run_dir),
                "--data",
                str(csv),
                "--greedy",
                "--limit",
                "3",
                "--max-new-tokens",
                "6",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert len((tmp_path / "out" / "predictions.txt").read_text().splitlines()) == 3
    assert '"num_beams": 1' in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(csv)]) == 2
    assert "pass a YAML run config, a run or adapter directory" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", str(csv), "--max-new-tokens", "500"]) == 2
    assert "lower --max-new-tokens" in capsys.readouterr().err


def _compressed_copy(run_dir, out, rank):
    """An adapter directory beside `run_dir`'s: its LoRA adapter re-compressed to `rank`
    (lj.compress), another adapter of the same base without a second training run."""
    adapted = load_adapted(run_dir)
    small, _ = lj.compress(lj.adapter(adapted.params), rank)
    meta = adapted.meta
    save_adapter(
        out,
        small,
        method="lora",
        model_name=meta["model"],
        lora={**meta["lora"], "rank": rank},
        base_fingerprint=meta["base_fingerprint"],
        model_options=meta["model_options"],
    )
    return out


def test_adapters_decoded_together_score_as_each_alone(trained, tmp_path, capsys):
    config, run_dir, csv = trained
    adapters = [run_dir / "adapter", _compressed_copy(run_dir, tmp_path / "rank1" / "adapter", 1)]
    # 3 MRs in a batch of 4: the padding row is decoded too, for each adapter.
    quick = ["--data", str(csv), "--greedy", "--limit", "3", "--max-new-tokens", "8"]
    quick += ["--batch-size", "4"]
    for i, adapter in enumerate(adapters):
        assert main(["eval", str(adapter), *quick, "--out", str(tmp_path / f"alone{i}")]) == 0
    together = tmp_path / "together"
    assert main(["eval", *map(str, adapters), *quick, "--out", str(together)]) == 0
    outputs = []
    for i, adapter in enumerate(adapters):
        mixed = together / f"{i}-{adapter.parent.name}"
        for name in (e2e_eval.PREDICTIONS_FILE, e2e_eval.SCORES_FILE):
            assert (mixed / name).read_text() == (tmp_path / f"alone{i}" / name).read_text()
        outputs.append((mixed / e2e_eval.PREDICTIONS_FILE).read_text())
    assert len(outputs[0].splitlines()) == 3
    assert outputs[0] != outputs[1]  # two adapters, not one decoded twice
    capsys.readouterr()
    assert main(["eval", str(run_dir), str(config), "--data", str(csv)]) == 2
    assert "neither a run directory nor an adapter directory" in capsys.readouterr().err
