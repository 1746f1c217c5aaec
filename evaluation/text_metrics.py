"""N-gram overlap of free-text answers: BLEU-4 (per sample and per corpus, sacrebleu) and ROUGE-L
(per sample, torchmetrics), each with a signature string naming exactly how it was computed.

Scores are on a 0-1 scale, as LUMEN reports them (sacrebleu's 0-100 is divided by 100).
"""

from __future__ import annotations

import sacrebleu
import torchmetrics
from sacrebleu.metrics import BLEU
from torchmetrics.functional.text.rouge import rouge_score

# Per sample: sacrebleu's sentence-BLEU settings. Unsmoothed BLEU-4 is 0 for any answer without a
# matching 4-gram (every answer under four words), which makes paired tests on short answers
# meaningless; "exp" is NIST's geometric smoothing (a zero-match order n gets 1 / (2^k * total_n),
# k counting the zero orders so far; Chen & Cherry method 3) and the effective order drops orders
# longer than the hypothesis. Lower-casing: Diff-VQA references are lower case, and a capital
# first word is not an error.
_SENTENCE_BLEU = BLEU(tokenize="13a", lowercase=True, smooth_method="exp", effective_order=True)
# Per corpus: unsmoothed, like the COCO-caption BLEU of the Medical-Diff-VQA papers (whose
# epsilon-sized smoothing changes nothing visible), with the same tokeniser and case folding.
_CORPUS_BLEU = BLEU(tokenize="13a", lowercase=True, smooth_method="none")

# sacrebleu's own signature strings (e.g. nrefs:1|case:lc|eff:yes|tok:13a|smooth:exp|version:2.6.0)
# exist only after a first score.
_SENTENCE_BLEU.sentence_score("warm up", ["warm up"])
_CORPUS_BLEU.corpus_score(["warm up"], [["warm up"]])
SENTENCE_BLEU_SIGNATURE = f"sacrebleu {_SENTENCE_BLEU.get_signature()}"
CORPUS_BLEU_SIGNATURE = f"sacrebleu {_CORPUS_BLEU.get_signature()}"
ROUGE_L_SIGNATURE = (f"torchmetrics {torchmetrics.__version__} rouge_score(rouge_keys='rougeL', "
                     "use_stemmer=False) fmeasure: LCS F-measure with beta = 1 (rouge-score's "
                     "default; COCO-caption uses 1.2), lower-cased, non-alphanumerics as spaces, "
                     "no stemming")


def sentence_bleu4(prediction: str, reference: str) -> float:
    """Smoothed sentence BLEU-4 of one prediction against one reference (`SENTENCE_BLEU_SIGNATURE`)."""
    return _SENTENCE_BLEU.sentence_score(prediction, [reference]).score / 100


def corpus_bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4: n-gram matches and lengths pooled over all pairs before the geometric mean
    and the brevity penalty (`CORPUS_BLEU_SIGNATURE`); not the mean of `sentence_bleu4`."""
    if len(predictions) != len(references):
        raise ValueError(f"corpus_bleu4 got {len(predictions)} predictions and {len(references)} "
                         "references; pass one reference per prediction")
    return _CORPUS_BLEU.corpus_score(predictions, [references]).score / 100


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of one prediction against one reference (`ROUGE_L_SIGNATURE`)."""
    return float(rouge_score(prediction, reference, rouge_keys="rougeL",
                             use_stemmer=False)["rougeL_fmeasure"])
