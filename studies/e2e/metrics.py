"""The E2E NLG challenge's five metrics, each output scored against ALL references of its MR.

:func:`score` returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` on the scales of
the challenge's script (``tuetschek/e2e-metrics``, ``measure_scores.py``), except BLEU,
which is on the 0-100 scale of the LoRA paper's Table 3 (the script prints 0-1; the paper
also multiplies METEOR and ROUGE-L by 100, see :data:`PAPER_SCALE`).

The official script runs Perl ``mteval-v13a`` for BLEU and NIST and the MS-COCO caption
toolkit (Java PTB tokenizer, Java METEOR 1.5, Python ROUGE-L and CIDEr-D) for the rest.
Here every metric is pure Python, with no Java or Perl: maintained packages, and a port of
mteval-v13a's NIST:

========  =====================================  ==========================================
metric    implementation                          differences from the official script
========  =====================================  ==========================================
BLEU      ``sacrebleu.corpus_bleu``, references   none by design: sacrebleu reproduces
          as streams padded with ``None``,        mteval-v13a (13a tokenisation, closest-
          ``lowercase=True``, ``tokenize='13a'``  reference brevity penalty, its smoothing
          (mteval-v13a lower-cases by default)    of zero n-gram counts); 0-100, not 0-1
NIST      own port of mteval-v13a.pl's NIST       none by design; it agrees with the Perl
          (:func:`nist`, after its subs           script to 1e-12 on E2E references and on
          ``compute_ngram_info``,                 synthetic sets with 1-6 references, down
          ``score_segment``, ``score_system``,    to Perl taking the n-gram prefix "0" for
          ``nist_score``) on lower-cased 13a      false. Only lower-casing differs: all of
          tokens (e2e-metrics runs mteval         Unicode here, A-Z in mteval (E2E has no
          without ``-c``, so lower-cased)         other capitals). nltk's ``corpus_nist``,
                                                  used before, scores each output against
                                                  its best single reference: lower with
                                                  several references (7.41 vs 8.58 on the
                                                  547 devset MRs, each output one of the
                                                  MR's references, held out of the rest)
METEOR    ``nltk.translate.meteor_score``         METEOR 1.5 (Java, ``-norm``) adds
          (exact, Porter-stem and WordNet-        paraphrase matches and tuned weights and
          synonym matches; max over references)  aggregates statistics over the corpus;
          on COCO-style tokens, averaged over     nltk's is the original METEOR with
          outputs; WordNet: ``studies/e2e/wordnet.py``  alpha 0.9, beta 3, gamma 0.5, averaged
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
METEOR and ROUGE-L, and for CIDEr when the tokenisations disagree.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from studies.e2e.wordnet import MISSING as WORDNET_MISSING
from studies.e2e.wordnet import wordnet

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
    return sacrebleu.corpus_bleu(list(hypotheses), streams, lowercase=True, tokenize="13a").score


def _ngrams(words: Sequence[str]) -> Counter[tuple[str, ...]]:
    """Counts of the 1- to NIST_ORDER-grams of ``words`` (mteval's ``Words2Ngrams``)."""
    return Counter(
        tuple(words[i : i + n]) for n in range(1, NIST_ORDER + 1) for i in range(len(words) - n + 1)
    )


def nist_length_penalty(ratio: float) -> float:
    """mteval's ``nist_length_penalty``: 1 from ratio 1 up, 0.5 at ratio 2/3, 0 at 0."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2  # the penalty is 0.5 at ratio 1/1.5
    return math.exp(-beta * math.log(ratio) ** 2)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST (n-grams up to 5) of mteval-v13a.pl, on lower-cased 13a tokens.

    A port of the Perl script as e2e-metrics runs it (no ``-c``, so lower-cased), one
    document whose segments are the outputs:

    - ``compute_ngram_info``: from the n-gram counts over all references of all outputs,
      ``info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))``, where the count of the
      empty prefix is the number of reference words.
    - ``score_segment``: each hypothesis n-gram counts at most as often as it occurs in
      the one reference of its output that holds it most often (max, not sum), and adds
      its info that many times; the output's non-empty references and their words are
      counted for the length penalty.
    - ``score_system`` / ``nist_score``: summed over outputs, the score is the sum over
      n = 1..5 of (info of the matched n-grams) / (hypothesis n-grams), times
      ``nist_length_penalty(hypothesis words / reference length)``, the reference length
      being all reference words / the mean number of non-empty references per output.
    """
    hyps = [tokens_13a(h) for h in hypotheses]
    refs = [[tokens_13a(r) for r in rs] for rs in references]

    # compute_ngram_info
    ngram_count: Counter[tuple[str, ...]] = Counter()
    for r in (r for rs in refs for r in rs):
        ngram_count.update(_ngrams(r))
    tot_wrds = sum(len(r) for rs in refs for r in rs)
    if tot_wrds == 0:
        return 0.0  # nothing can match (mteval divides by zero)

    def ngram_info(ngram: tuple[str, ...]) -> float:
        mgram = ngram[:-1]
        # Perl's `$mgram ? count{$mgram} : $tot_wrds` also takes the string "0" for false.
        prefix_count = ngram_count[mgram] if mgram and mgram != ("0",) else tot_wrds
        return math.log2(prefix_count / ngram_count[ngram])

    # score_segment for each output, accumulated as score_document / score_system do
    tst_info = [0.0] * (NIST_ORDER + 1)
    tst_count = [0] * (NIST_ORDER + 1)
    ref_words = nrefs = 0
    for tst_wrds, ref_segs in zip(hyps, refs, strict=True):
        ref_ngrams_max: Counter[tuple[str, ...]] = Counter()
        for ref_wrds in ref_segs:
            ref_ngrams_max |= _ngrams(ref_wrds)  # | keeps the max count
        nrefs += sum(1 for ref_wrds in ref_segs if ref_wrds)
        ref_words += sum(len(ref_wrds) for ref_wrds in ref_segs)
        for n in range(1, NIST_ORDER + 1):
            tst_count[n] += max(len(tst_wrds) - n + 1, 0)
        for ngram, count in _ngrams(tst_wrds).items():
            if ngram in ref_ngrams_max:
                tst_info[len(ngram)] += ngram_info(ngram) * min(count, ref_ngrams_max[ngram])

    # nist_score
    nsys = nrefs / len(hyps)
    score = sum(tst_info[n] / max(tst_count[n], 1) for n in range(1, NIST_ORDER + 1))
    return score * nist_length_penalty(tst_count[1] / (ref_words / nsys))


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """Mean nltk METEOR over outputs on COCO-style tokens; None without WordNet."""
    reader = wordnet()
    if reader is None:
        return None
    from nltk.translate.meteor_score import meteor_score  # nltk imports scipy: ~1.5 s

    return statistics.fmean(
        meteor_score([coco_tokens(r) for r in refs], coco_tokens(h), wordnet=reader)
        for h, refs in zip(hypotheses, references, strict=True)
    )


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over outputs of the best ROUGE-L F1 among the references (rouge-score)."""
    scorer = RougeScorer(["rougeL"])
    return statistics.fmean(
        scorer.score_multi(list(refs), h)["rougeL"].fmeasure
        for h, refs in zip(hypotheses, references, strict=True)
    )


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D of pycocoevalcap on COCO-style tokens."""

    def joined(text: str) -> str:
        return " ".join(coco_tokens(text))

    gts = {i: [joined(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [joined(h)] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(gts, res)[0])


def score(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float | None]:
    """The five metrics of ``hypotheses[i]`` against all of ``references[i]``.

    METEOR is None when no WordNet is installed (:func:`notes` says why).
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need one list of references per output and at least one output; "
            f"got {len(hypotheses)} outputs and {len(references)} reference lists"
        )
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"outputs {empty[:5]} have no reference; every MR needs at least one")
    return {
        "BLEU": bleu(hypotheses, references),
        "NIST": nist(hypotheses, references),
        "METEOR": meteor(hypotheses, references),
        "ROUGE_L": rouge_l(hypotheses, references),
        "CIDEr": cider(hypotheses, references),
    }


def notes(scores: dict[str, float | None]) -> list[str]:
    """Why a score is missing, one line per missing score."""
    return [f"METEOR is null: {WORDNET_MISSING}"] if scores["METEOR"] is None else []
