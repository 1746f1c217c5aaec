import math
import random

import pytest
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

from evaluation.text_metrics import corpus_bleu4, rouge_l, sentence_bleu4

# Words without punctuation, so sacrebleu's 13a tokeniser and nltk's pre-split lists see the same
# tokens; a small vocabulary makes n-gram matches of every order common.
WORDS = ("left", "right", "pleural", "effusion", "small", "large", "the", "is", "of", "edema",
         "has", "resolved", "new", "lung")
# ROUGE-L inputs also carry case and punctuation, which both tokenisers fold and split alike.
ROUGE_WORDS = WORDS + ("Left", "Effusion.", "lung,", "3.5", "cm", "(mild)", "x-ray", "is:", "-")


def random_text(rng: random.Random, words: tuple[str, ...], shortest: int, longest: int) -> str:
    return " ".join(rng.choices(words, k=rng.randint(shortest, longest)))


def random_pairs(seed: int, count: int, words=WORDS, shortest=1, longest=12) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(random_text(rng, words, shortest, longest), random_text(rng, words, shortest, longest))
            for _ in range(count)]


def test_sentence_bleu4_equals_nltk_nist_smoothing_with_effective_order_on_500_pairs():
    # sacrebleu's "exp" smoothing is nltk's method3, and its effective order (orders longer than
    # the hypothesis dropped) is nltk's auto_reweigh.
    smoothing = SmoothingFunction().method3
    for prediction, reference in random_pairs(seed=0, count=500):
        expected = sentence_bleu([reference.split()], prediction.split(), smoothing_function=smoothing,
                                 auto_reweigh=True)
        assert sentence_bleu4(prediction, reference) == pytest.approx(expected, abs=1e-6)


# Some corpora have no matching 4-gram: both give 0, nltk with a warning saying so.
@pytest.mark.filterwarnings("ignore::UserWarning:nltk.translate.bleu_score")
def test_corpus_bleu4_equals_nltk_unsmoothed_corpus_bleu_on_100_corpora():
    # Hypotheses of four or more words only: for a shorter one nltk counts one n-gram of each
    # missing order in the denominator, sacrebleu none, and the definitions part.
    rng = random.Random(1)
    for _ in range(100):
        pairs = random_pairs(seed=rng.randrange(10**6), count=rng.randint(1, 30), shortest=4, longest=15)
        predictions, references = zip(*pairs)
        expected = corpus_bleu([[reference.split()] for reference in references],
                               [prediction.split() for prediction in predictions])
        assert corpus_bleu4(list(predictions), list(references)) == pytest.approx(expected, abs=1e-6)


def test_sentence_bleu4_of_identical_text_is_one():
    assert sentence_bleu4("left pleural effusion", "left pleural effusion") == pytest.approx(1.0)


def test_sentence_bleu4_of_a_short_partial_answer_is_smoothed_not_zero():
    # Two words: effective order 2; p1 = 2/2, p2 = 0 matches of 1 -> 1/2; brevity exp(1 - 3/2).
    expected = math.exp(1 - 3 / 2) * math.sqrt(1 * 0.5)
    assert sentence_bleu4("left side", "left lower side") == pytest.approx(expected)


def test_sentence_bleu4_counts_a_final_period_as_a_token():
    # 13a splits "effusion." into "effusion ."; p = 3/4, 2/3, 1/2 and the zero 4-gram order 1/2.
    expected = (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** (1 / 4)
    assert sentence_bleu4("left pleural effusion.", "left pleural effusion") == pytest.approx(expected)


def test_sentence_bleu4_ignores_case():
    assert sentence_bleu4("Left Pleural Effusion", "left pleural effusion") == pytest.approx(1.0)


def test_sentence_bleu4_without_a_shared_word_is_zero():
    assert sentence_bleu4("cardiomegaly", "pneumothorax") == 0.0


def test_sentence_bleu4_of_an_empty_prediction_is_zero():
    assert sentence_bleu4("", "left pleural effusion") == 0.0


def test_corpus_bleu4_pools_counts_rather_than_averaging_sentences():
    predictions = ["the left pleural effusion has resolved", "edema"]
    references = ["the left pleural effusion has resolved", "new edema of the lung"]
    pooled = corpus_bleu4(predictions, references)
    mean = (sentence_bleu4(predictions[0], references[0]) + sentence_bleu4(predictions[1], references[1])) / 2
    assert pooled != pytest.approx(mean)
    # 7 of 7 unigrams, 5/5, 4/4, 3/3 match; brevity penalty exp(1 - 11/7).
    assert pooled == pytest.approx(math.exp(1 - 11 / 7))


def test_corpus_bleu4_needs_one_reference_per_prediction():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        corpus_bleu4(["a", "b"], ["a"])


def test_rouge_l_equals_rouge_score_on_500_pairs():
    scorer = RougeScorer(["rougeL"])
    for prediction, reference in random_pairs(seed=2, count=500, words=ROUGE_WORDS):
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-6)


def test_rouge_l_is_the_lcs_f_measure_with_beta_one():
    # LCS "left lower lung" = 3: precision 3/3, recall 3/4, F = 2PR / (P + R) = 6/7.
    assert rouge_l("left lower lung", "left lower lung area") == pytest.approx(6 / 7)


def test_rouge_l_counts_a_subsequence_not_only_a_contiguous_run():
    # LCS "left effusion" = 2 of 3 words on each side.
    assert rouge_l("left small effusion", "left pleural effusion") == pytest.approx(2 / 3)


def test_rouge_l_of_an_empty_prediction_is_zero():
    assert rouge_l("", "left pleural effusion") == 0.0
