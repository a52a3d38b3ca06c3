"""The E2E NLG challenge's five metrics, each output scored against ALL references of its MR.

:func:`score` returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` on the scales of
the challenge's script (``tuetschek/e2e-metrics``, ``measure_scores.py``), except BLEU,
which is on the 0-100 scale of the LoRA paper's Table 3 (the script prints 0-1; the paper
also multiplies METEOR and ROUGE-L by 100, see :data:`PAPER_SCALE`).

The official script runs Perl ``mteval-v13a`` for BLEU and NIST and the MS-COCO caption
toolkit (Java PTB tokenizer, Java METEOR 1.5, Python ROUGE-L and CIDEr-D) for the rest.
Here every metric is a maintained Python package, with no Java or Perl:

========  =====================================  ==========================================
metric    implementation                          differences from the official script
========  =====================================  ==========================================
BLEU      ``sacrebleu.corpus_bleu``, references   none by design: sacrebleu reproduces
          as streams padded with ``None``,        mteval-v13a (13a tokenisation, closest-
          ``lowercase=True``, ``tokenize='13a'``  reference brevity penalty, its smoothing
          (mteval-v13a lower-cases by default)    of zero n-gram counts); 0-100, not 0-1
NIST      ``nltk.translate.nist_score.            same n-gram orders (1-5) and information
          corpus_nist`` on 13a tokens, lower-     weights from the references; nltk takes,
          cased; orders without any hypothesis    per output and order, the counts of the
          n-gram are left out (they add 0 in      reference with the best precision and
          mteval, nltk would divide by zero)      that reference's length for the penalty,
                                                  where mteval clips against all references
                                                  at once and uses their mean length: lower
                                                  with several references (6.13 vs 6.93 for
                                                  e2e-metrics' mteval port on a synthetic
                                                  56-MR set with 1-6 references each)
METEOR    ``nltk.translate.meteor_score``         METEOR 1.5 (Java, ``-norm``) adds
          (exact, Porter-stem and WordNet-        paraphrase matches and tuned weights and
          synonym matches; max over references)  aggregates statistics over the corpus;
          on COCO-style tokens, averaged over     nltk's is the original METEOR with
          outputs; WordNet: ``train/wordnet.py``  alpha 0.9, beta 3, gamma 0.5, averaged
                                                  per output; null when no WordNet is found
ROUGE_L   ``rouge_score`` ``RougeScorer           COCO's ROUGE-L takes the best precision
          (['rougeL']).score_multi``: F1 of the   and the best recall over references
          best reference, averaged over outputs;  separately and an F with beta 1.2;
          its own tokeniser (lower-case,          tokens differ slightly (PTB vs
          alphanumeric runs), no stemming         alphanumeric runs)
CIDEr     ``pycocoevalcap.cider.Cider`` (the      the same code; only the tokens differ
          CIDEr-D of the official script: n<=4,   (13a tokens without punctuation instead
          sigma 6, clipped counts, x10, document  of Java's PTB tokenizer); needs several
          frequencies from these references) on   MRs (one MR: every n-gram's idf is 0)
          COCO-style tokens
========  =====================================  ==========================================

COCO-style tokens (:func:`coco_tokens`) stand in for the PTB tokenizer, which
lower-cases and drops punctuation: lower-cased 13a tokens without the tokens that hold
no letter or digit. So scores are close to, not identical with, the official ones for
NIST, METEOR and ROUGE-L, and for CIDEr when the tokenisations disagree.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import sacrebleu
from nltk.translate.meteor_score import meteor_score
from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from train.wordnet import MISSING as WORDNET_MISSING
from train.wordnet import wordnet

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
# Factor from these scores to the LoRA paper's Table 3 (BLEU is already 0-100 here).
PAPER_SCALE = {"BLEU": 1.0, "NIST": 1.0, "METEOR": 100.0, "ROUGE_L": 100.0, "CIDEr": 1.0}
NIST_ORDER = 5
_TOKENIZE_13A = Tokenizer13a()


def tokens_13a(text: str) -> list[str]:
    """mteval-v13a's tokens of the lower-cased text."""
    return _TOKENIZE_13A(text.lower()).split()


def coco_tokens(text: str) -> list[str]:
    """Lower-cased 13a tokens that hold a letter or digit (punctuation dropped, as COCO's)."""
    return [t for t in tokens_13a(text) if any(c.isalnum() for c in t)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU, 0-100: sacrebleu as mteval-v13a (lower-cased 13a tokens)."""
    most = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams, lowercase=True,
                                 tokenize="13a").score


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST (n-grams up to 5) with nltk, on lower-cased 13a tokens."""
    hyps = [tokens_13a(h) for h in hypotheses]
    order = min(NIST_ORDER, max(len(h) for h in hyps))
    if order == 0:
        return 0.0
    return corpus_nist([[tokens_13a(r) for r in refs] for refs in references], hyps, n=order)


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """Mean nltk METEOR over outputs on COCO-style tokens; None without WordNet."""
    reader = wordnet()
    if reader is None:
        return None
    return statistics.fmean(
        meteor_score([coco_tokens(r) for r in refs], coco_tokens(h), wordnet=reader)
        for h, refs in zip(hypotheses, references, strict=True))


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over outputs of the best ROUGE-L F1 among the references (rouge-score)."""
    scorer = RougeScorer(["rougeL"])
    return statistics.fmean(scorer.score_multi(list(refs), h)["rougeL"].fmeasure
                            for h, refs in zip(hypotheses, references, strict=True))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D of pycocoevalcap on COCO-style tokens."""
    def joined(text: str) -> str:
        return " ".join(coco_tokens(text))

    gts = {i: [joined(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [joined(h)] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(gts, res)[0])


def score(hypotheses: Sequence[str],
          references: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """The five metrics of ``hypotheses[i]`` against all of ``references[i]``.

    METEOR is None when no WordNet is installed (:func:`notes` says why).
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"need one list of references per output and at least one output; "
                         f"got {len(hypotheses)} outputs and {len(references)} reference lists")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"outputs {empty[:5]} have no reference; every MR needs at least one")
    return {"BLEU": bleu(hypotheses, references), "NIST": nist(hypotheses, references),
            "METEOR": meteor(hypotheses, references), "ROUGE_L": rouge_l(hypotheses, references),
            "CIDEr": cider(hypotheses, references)}


def notes(scores: dict[str, float | None]) -> list[str]:
    """Why a score is missing, one line per missing score."""
    return [f"METEOR is null: {WORDNET_MISSING}"] if scores["METEOR"] is None else []
