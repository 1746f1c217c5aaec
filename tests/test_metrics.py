import math
import re
from collections import defaultdict

import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

from evaluation.metrics import (
    CORPUS_METRIC_SIGNATURES,
    METRIC_SIGNATURES,
    change_f1,
    closed_correct,
    closed_correct_llava_med,
    corpus_metrics,
    difference_correct,
    exact_match,
    extract_yes_no,
    is_closed,
    normalize_answer,
    parse_difference,
    score_sample,
    token_recall,
    token_recall_clipped,
)

# --- LLaVA-Med reference: a direct transcription of llava/eval/eval_metrics/{glossary,utils,
# evaluate_metrics}.py, kept independent of the module under test. The contraction table is cut
# down to the entries the pairs below use.

LLAVA_CONTRACTIONS = {"isnt": "isn't", "theres": "there's", "dont": "don't", "doesnt": "doesn't"}
LLAVA_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
LLAVA_ARTICLES = ["a", "an", "the"]
LLAVA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
LLAVA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
LLAVA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]


def llava_normalize_word(token):
    _token = token
    for p in LLAVA_PUNCT:
        if (p + " " in token or " " + p in token) or (re.search(LLAVA_COMMA_STRIP, token) != None):
            _token = _token.replace(p, "")
        else:
            _token = _token.replace(p, " ")
    token = LLAVA_PERIOD_STRIP.sub("", _token, re.UNICODE)
    _token = []
    temp = token.lower().split()
    for word in temp:
        word = LLAVA_MANUAL_MAP.setdefault(word, word)
        if word not in LLAVA_ARTICLES:
            _token.append(word)
    for i, word in enumerate(_token):
        if word in LLAVA_CONTRACTIONS:
            _token[i] = LLAVA_CONTRACTIONS[word]
    token = " ".join(_token)
    token = token.replace(",", "")
    return token


def llava_split_sentence(sentence, n):
    words = defaultdict(int)
    tmp_sentence = sentence.lower().strip().split()
    for i in range(len(tmp_sentence) - n + 1):
        tmp_words = " ".join(tmp_sentence[i: i + n])
        if tmp_words:
            words[tmp_words] += 1
    return words


def llava_recall(candidate, reference):
    candidate_words = llava_split_sentence(llava_normalize_word(candidate), 1)
    reference_words = llava_split_sentence(llava_normalize_word(reference), 1)
    word_set = set(candidate_words) | set(reference_words)
    tp = fp = fn = 0
    for word in word_set:
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words and word not in reference_words:
            fp += candidate_words[word]
        elif word not in candidate_words and word in reference_words:
            fn += reference_words[word]
    if len(candidate_words) == 0 or len(reference_words) == 0:
        return 0
    recall = tp / (tp + fn)
    return 0 if tp == 0 else recall


PAIRS = [
    ("left pleural effusion", "pleural effusion"),
    ("effusion", "left pleural effusion"),
    ("effusion effusion effusion", "left effusion"),
    ("", "effusion"),
    ("effusion", ""),
    ("", ""),
    ("cardiomegaly", "pneumothorax"),
    ("two nodules", "2 nodules"),
    ("There are three rib fractures.", "3 fractures"),
    ("The effusion is on the left side.", "left side"),
    ("an AP view", "AP view"),
    ("It's a PA view!", "PA view"),
    ("left-sided effusion", "left sided effusion"),
    ("effusion - left", "left effusion"),
    ("1,000 ml (approx.) of fluid", "1000 ml fluid"),
    ("size 3.5 cm", "3.5 cm"),
    ("isnt present", "isn't present"),
    ("there's no change", "theres no change"),
    ("right/left lower lobe", "right lower lobe"),
    ("mild to moderate edema, worse on the right", "moderate edema"),
    ("[atelectasis]; {edema}", "atelectasis, edema"),
    ("none", "0"),
    ("None of the above", "no"),
    ("Yes, there is a small left apical pneumothorax.", "left apical area"),
    ("left apical area left apical area", "left apical area"),
    ("what? where!", "where"),
    ('"quoted" answer_text', "quoted answer text"),
    ("ten", "10"),
    ("e.g. edema", "edema"),
    ("LEFT LOWER LOBE", "left lower lobe"),
    ("left-sided - effusion", "left sided effusion"),
    ("chest x-ray 1,000", "chest x ray"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_token_recall_equals_llava_med_reference_implementation(prediction, reference):
    assert token_recall(prediction, reference) == pytest.approx(llava_recall(prediction, reference))


@pytest.mark.parametrize("text", sorted({text for pair in PAIRS for text in pair}))
def test_normalize_answer_equals_llava_med_normalize_word(text):
    assert normalize_answer(text) == llava_normalize_word(text)


def test_normalize_answer_strips_every_period_not_only_the_first_32():
    assert normalize_answer("effusion. " * 40) == " ".join(["effusion"] * 40)


def test_normalize_answer_maps_number_words_drops_articles_and_restores_apostrophes():
    assert normalize_answer("The Two effusions ISNT an issue.") == "2 effusions isn't issue"


def test_token_recall_of_partial_answer_counts_missing_reference_words():
    assert token_recall("effusion", "left pleural effusion") == pytest.approx(1 / 3)


def test_token_recall_ignores_extra_prediction_words():
    assert token_recall("small left pleural effusion", "pleural effusion") == 1.0


def test_token_recall_is_inflated_by_repeating_a_correct_word():
    assert token_recall("effusion effusion effusion", "left effusion") == pytest.approx(3 / 4)


def test_token_recall_is_zero_without_shared_words():
    assert token_recall("cardiomegaly", "pneumothorax") == 0.0


def test_token_recall_is_zero_for_an_empty_prediction():
    assert token_recall("", "left side") == 0.0


def test_token_recall_matches_number_words_to_digits_and_ignores_articles():
    assert token_recall("the two nodules", "2 nodules") == 1.0


def test_token_recall_clipped_caps_repeated_words_at_reference_count():
    assert token_recall_clipped("effusion effusion effusion", "left effusion") == pytest.approx(1 / 2)


def test_token_recall_clipped_keeps_reference_repeats_recalled_by_one_mention():
    assert token_recall_clipped("small", "small small") == 1.0


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_token_recall_clipped_never_exceeds_token_recall(prediction, reference):
    assert token_recall_clipped(prediction, reference) <= token_recall(prediction, reference)


def test_token_recall_clipped_equals_token_recall_without_repetition():
    assert token_recall_clipped("small left effusion", "left effusion") == token_recall(
        "small left effusion", "left effusion")


# --- yes/no extraction

# Every phrasing with the reading it must get: "yes", "no", or None (unparsed: hedged, mixed or
# silent), never a guess.
YES_NO_READINGS = [
    ("yes", "yes"),
    ("Yes.", "yes"),
    ("YES", "yes"),
    ("Yes, there is a small left pleural effusion.", "yes"),
    ("Yes, there is.", "yes"),
    ("There is a small right effusion.", "yes"),
    ("There are bilateral effusions.", "yes"),
    ("The answer is yes.", "yes"),
    ("Consolidation is present in the left lower lobe.", "yes"),
    ("A pneumothorax is seen at the right apex.", "yes"),
    ("Positive.", "yes"),
    ("Cardiomegaly is evident and the effusion is visible.", "yes"),
    ("no", "no"),
    ("No.", "no"),
    ("No, there is no effusion.", "no"),
    ("No, there is not.", "no"),
    ("No, there isn\u2019t.", "no"),
    ("There is no effusion.", "no"),
    ("there is no evidence of pneumothorax", "no"),
    ("No evidence of pneumothorax.", "no"),
    ("The pneumothorax is not seen.", "no"),
    ("The effusion isn't present", "no"),
    ("not", "no"),
    ("None.", "no"),
    ("Negative.", "no"),
    ("The answer is no.", "no"),
    ("There is no effusion and no pneumothorax.", "no"),
    ("", None),
    ("the heart size is normal", None),
    ("nodule", None),
    ("left lower lobe", None),
    ("I don't know.", None),
    ("I do not know", None),
    ("It can not be determined.", None),
    ("I'm not able to tell.", None),
    ("No idea.", None),
    ("There is no way to tell from this image.", None),
    ("Not assessable on this view.", None),
    ("Unknown.", None),
    ("It cannot be determined from this image.", None),
    ("Unclear.", None),
    ("yes and no", None),
    ("yes or no", None),
    ("Yes/no", None),
    ("Yes, but no effusion.", None),
    ("No, there is a small effusion.", None),
    ("there is an effusion but no pneumothorax", None),
    ("There is an effusion. There is no pneumothorax.", None),
    ("a pneumothorax cannot be excluded", None),
    ("possibly a small effusion", None),
    ("maybe yes", None),
    ("Probably not.", None),
    ("I'm not sure.", None),
    ("It is difficult to say.", None),
    ("The findings are inconclusive.", None),
]


@pytest.mark.parametrize(("text", "reading"), YES_NO_READINGS, ids=[text or "<empty>" for text, _ in YES_NO_READINGS])
def test_extract_yes_no_reads_each_phrasing_without_guessing(text, reading):
    assert extract_yes_no(text) == reading


def test_closed_correct_accepts_verbose_yes_that_exact_match_rejects():
    prediction = "Yes, there is a small left pleural effusion."
    assert closed_correct(prediction, "yes")
    assert not exact_match(prediction, "yes")


def test_closed_correct_does_not_read_normal_as_no():
    assert not closed_correct("normal", "no")


def test_closed_correct_marks_wrong_polarity_wrong():
    assert not closed_correct("there is no effusion", "yes")


def test_closed_correct_rejects_an_open_reference():
    with pytest.raises(ValueError, match="yes/no reference"):
        closed_correct("yes", "left side")


# (prediction, reference, LLaVA-Med's rule, ours), the first worked out by hand from
# run_eval_batch.py: lower-case, normalize_word both, then `reference in prediction`.
LLAVA_MED_CLOSED = [
    ("nodule", "no", True, False),
    ("normal", "no", True, False),
    ("The heart size is normal.", "no", True, False),
    ("I don't know.", "no", True, False),
    ("Unknown.", "no", True, False),
    ("A pneumothorax cannot be excluded.", "no", True, False),
    ("eyes", "yes", True, False),
    ("yes and no", "yes", True, False),
    ("yes and no", "no", True, False),
    ("Yes, but no effusion.", "no", True, False),
    ("None.", "no", False, True),
    ("There is a small effusion.", "yes", False, True),
    ("Negative.", "no", False, True),
    ("Positive.", "yes", False, True),
    ("Yes, there is a small effusion.", "yes", True, True),
    ("No, there is no effusion.", "no", True, True),
    ("The effusion is not seen.", "no", True, True),
    ("YES", "Yes.", True, True),
    ("There is no effusion.", "yes", False, False),
    ("", "no", False, False),
]


@pytest.mark.parametrize(("prediction", "reference", "llava_med", "ours"), LLAVA_MED_CLOSED,
                         ids=[f"{prediction or '<empty>'}|{reference}" for prediction, reference, *_ in LLAVA_MED_CLOSED])
def test_closed_accuracy_llava_med_keeps_the_quirks_that_ours_avoids(prediction, reference, llava_med, ours):
    assert closed_correct_llava_med(prediction, reference) is llava_med
    assert closed_correct(prediction, reference) is ours


@pytest.mark.parametrize("reference", ["yes", "no"])
@pytest.mark.parametrize("prediction", [text for text, _ in YES_NO_READINGS],
                         ids=[text or "<empty>" for text, _ in YES_NO_READINGS])
def test_closed_accuracy_llava_med_equals_the_reference_substring_rule(prediction, reference):
    expected = llava_normalize_word(reference.lower()) in llava_normalize_word(prediction.lower())
    assert closed_correct_llava_med(prediction, reference) is expected


def test_closed_accuracy_llava_med_rejects_an_open_reference():
    with pytest.raises(ValueError, match="yes/no reference"):
        closed_correct_llava_med("yes", "left side")


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The Left Side.", "left side")


@pytest.mark.parametrize(("reference", "expected"), [
    ("yes", True), ("No.", True), ("left side", False), ("no change", False)])
def test_is_closed_only_for_bare_yes_or_no(reference, expected):
    assert is_closed(reference) is expected


# --- difference grammar

GENERATOR_ANSWER = (
    "the level of pleural effusion has changed from small to moderate to large. "
    "the main image has additional findings of consolidation, and pneumonia than the reference "
    "image. the main image is missing the findings of pleural thickening, pneumothorax, and "
    "atelectasis than the reference image. "
)


def test_parse_difference_single_added_finding():
    findings = parse_difference(
        "the main image has an additional finding of edema than the reference image. ")
    assert findings.parsed
    assert findings.added == {"edema"}
    assert findings.missing == frozenset()


def test_parse_difference_three_item_list():
    findings = parse_difference("the main image has additional findings of edema, atelectasis, "
                                "and lung opacity than the reference image.")
    assert findings.added == {"edema", "atelectasis", "lung opacity"}


def test_parse_difference_generator_two_item_quirk():
    findings = parse_difference("the main image has additional findings of consolidation, and "
                                "pneumonia than the reference image. ")
    assert findings.added == {"consolidation", "pneumonia"}


@pytest.mark.parametrize("listed", ["edema and atelectasis and cardiomegaly",
                                    "edema, atelectasis and cardiomegaly"])
def test_parse_difference_plain_english_lists(listed):
    findings = parse_difference(
        f"the main image has additional findings of {listed} than the reference image.")
    assert findings.added == {"edema", "atelectasis", "cardiomegaly"}


def test_parse_difference_missing_single_finding():
    findings = parse_difference(
        "the main image is missing the finding of enlargement of the cardiac silhouette than the "
        "reference image. ")
    assert findings.missing == {"enlargement of the cardiac silhouette"}
    assert findings.added == frozenset()


def test_parse_difference_level_change():
    findings = parse_difference("the level of edema has changed from mild to moderate. ")
    assert findings.parsed
    assert findings.level_changes == (("edema", "mild", "moderate"),)


def test_parse_difference_level_change_with_compound_level():
    findings = parse_difference("the level of edema has changed from small to moderate to large.")
    assert findings.level_changes == (("edema", "small", "moderate to large"),)


def test_a_level_sentence_that_reads_two_ways_keeps_the_rest_of_the_answer_and_is_marked():
    findings = parse_difference("the main image has an additional finding of atelectasis than the reference image. "
                                "the level of edema has changed from mild to moderate to severe.")
    assert findings.parsed and findings.added == {"atelectasis"} and findings.level_changes == ()
    assert findings.ambiguous_levels == {("edema", "mild to moderate to severe")}


def test_parse_difference_level_added_and_missing_in_one_answer():
    findings = parse_difference(GENERATOR_ANSWER)
    assert findings.parsed
    assert findings.level_changes == (("pleural effusion", "small", "moderate to large"),)
    assert findings.added == {"consolidation", "pneumonia"}
    assert findings.missing == {"pleural thickening", "pneumothorax", "atelectasis"}


def test_parse_difference_nothing_has_changed():
    findings = parse_difference("nothing has changed.")
    assert findings.parsed
    assert (findings.added, findings.missing, findings.level_changes) == (frozenset(), frozenset(), ())


def test_parse_difference_tolerates_case_and_generator_spacing():
    # The official name "tortuosity of the descending aorta " carries a trailing space.
    findings = parse_difference("The main image has additional findings of tortuosity of the "
                                "descending aorta , and edema  than the reference image.  ")
    assert findings.added == {"tortuosity of the descending aorta", "edema"}


def test_parse_difference_reads_infection_as_pneumonia():
    findings = parse_difference(
        "the main image is missing the finding of infection than the reference image.")
    assert findings.missing == {"pneumonia"}


@pytest.mark.parametrize("text", [
    "",
    "the lungs look worse than before.",
    "the main image has an additional finding of edema than the reference image. the heart is big.",
    "nothing has changed. the main image has an additional finding of edema than the reference image.",
    "the main image has additional findings of edema, than the reference image.",
])
def test_parse_difference_unparseable_text_has_no_findings(text):
    findings = parse_difference(text)
    assert not findings.parsed
    assert (findings.added, findings.missing, findings.level_changes) == (frozenset(), frozenset(), ())


def test_difference_correct_ignores_list_order():
    assert difference_correct(
        "the main image has additional findings of atelectasis, edema, and cardiomegaly than the "
        "reference image.",
        "the main image has additional findings of cardiomegaly, atelectasis, and edema than the "
        "reference image. ")


def test_difference_correct_treats_pneumonia_and_infection_as_one_finding():
    assert difference_correct(
        "the main image has an additional finding of infection than the reference image.",
        "the main image has an additional finding of pneumonia than the reference image. ")


def test_difference_correct_requires_same_missing_findings():
    assert not difference_correct(
        "the main image has an additional finding of edema than the reference image.",
        "the main image has an additional finding of edema than the reference image. the main "
        "image is missing the finding of atelectasis than the reference image. ")


def test_difference_correct_ignores_level_changes_by_default():
    assert difference_correct("nothing has changed.",
                              "the level of edema has changed from mild to moderate. ")


def test_difference_correct_compares_level_changes_when_asked():
    assert not difference_correct("the level of edema has changed from mild to severe.",
                                  "the level of edema has changed from mild to moderate. ",
                                  compare_levels=True)


def test_difference_correct_marks_unparseable_prediction_wrong():
    assert not difference_correct("nothing really", "nothing has changed.")


def test_difference_correct_rejects_unparseable_reference():
    with pytest.raises(ValueError, match="not a Medical-Diff-VQA difference answer"):
        difference_correct("nothing has changed.", "The effusion has grown since the last study.")


# --- per-sample scoring

EDEMA_LEVEL = "the level of edema has changed from mild to moderate. "


def record(question_type, prediction, reference, task="diagnostic"):
    return {"sample_id": "s1", "task": task, "question_type": question_type,
            "question": "q?", "prediction": prediction, "reference": reference}


def nltk_bleu4(prediction_tokens: str, reference_tokens: str) -> float:
    """The reference for sentence BLEU-4: nltk's, on text tokenised here by hand as sacrebleu's 13a
    tokeniser does (lowercased, punctuation split off), with method3 smoothing (sacrebleu's "exp") and
    auto_reweigh (its effective order); tests/test_text_metrics.py shows the two agree on 500 pairs."""
    return sentence_bleu([reference_tokens.split()], prediction_tokens.split(),
                         smoothing_function=SmoothingFunction().method3, auto_reweigh=True)


def rouge_score_l(prediction: str, reference: str) -> float:
    """The reference for ROUGE-L: Google's rouge-score F-measure."""
    return RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


def test_score_sample_difference_question():
    scores = score_sample(record(
        "difference", "nothing has changed.",
        "the level of edema has changed from mild to moderate. ", task="difference"))
    assert scores == {"difference_correct": 1, "difference_correct_with_levels": 0,
                      "difference_parsed": 1, "difference_reference_parsed": 1,
                      "difference_reference_levels_ambiguous": 0,
                      "bleu4": pytest.approx(nltk_bleu4("nothing has changed .",
                                                        "the level of edema has changed from mild to moderate .")),
                      "rougeL": pytest.approx(rouge_score_l("nothing has changed.", EDEMA_LEVEL))}


ADDED_EFFUSION_MISSING_ATELECTASIS = (
    "the main image has an additional finding of pleural effusion than the reference image. "
    "the main image is missing the finding of atelectasis than the reference image. ")


def test_score_sample_difference_question_scores_chexpert_labels_of_free_text():
    scores = score_sample(record(
        "difference", "There is a new pleural effusion; the pneumothorax has resolved.",
        ADDED_EFFUSION_MISSING_ATELECTASIS, task="difference"))
    assert (scores["difference_parsed"], scores["chexpert_added_accuracy"],
            scores["chexpert_missing_accuracy"]) == (0, 1, 0)


def test_chexpert_accuracies_of_an_empty_answer_are_zero():
    scores = score_sample(record("difference", "", ADDED_EFFUSION_MISSING_ATELECTASIS, task="difference"))
    assert (scores["chexpert_added_accuracy"], scores["chexpert_missing_accuracy"]) == (0, 0)


def test_chexpert_accuracies_of_the_reference_answer_are_one():
    scores = score_sample(record("difference", ADDED_EFFUSION_MISSING_ATELECTASIS,
                                 ADDED_EFFUSION_MISSING_ATELECTASIS, task="difference"))
    assert (scores["chexpert_added_accuracy"], scores["chexpert_missing_accuracy"]) == (1, 1)


def test_chexpert_accuracy_does_not_apply_where_the_reference_has_no_label_of_its_kind():
    added_only = "the main image has an additional finding of pleural effusion than the reference image. "
    scores = score_sample(record("difference", "", added_only, task="difference"))
    assert "chexpert_added_accuracy" in scores and "chexpert_missing_accuracy" not in scores


def test_score_sample_closed_question():
    scores = score_sample(record("presence", "Yes, there is.", "yes"))
    assert scores == {"closed_accuracy": 1, "closed_accuracy_llava_med": 1, "exact_match": 0,
                      "bleu4": pytest.approx(nltk_bleu4("yes , there is .", "yes")),
                      "rougeL": pytest.approx(0.5)}


def test_score_sample_open_question():
    scores = score_sample(record("location", "left lower lung", "left lower lung area"))
    assert scores == {"token_recall": pytest.approx(3 / 4), "token_recall_clipped": pytest.approx(3 / 4),
                      "bleu4": pytest.approx(nltk_bleu4("left lower lung", "left lower lung area")),
                      "rougeL": pytest.approx(6 / 7)}


def test_score_sample_diagnostic_overlap_uses_the_enhanced_answer_and_recall_the_short_one():
    enhanced = record("location", "The effusion is in the left lower lung.", "left lower lung")
    enhanced["answer"] = "The effusion is in the left lower lung."
    scores = score_sample(enhanced)
    assert scores["bleu4"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(1.0)
    assert scores["token_recall"] == 1.0


def test_score_sample_overlap_without_an_enhanced_answer_uses_the_reference():
    scores = score_sample(record("location", "left lower lung", "left lower lung"))
    assert (scores["bleu4"], scores["rougeL"]) == (pytest.approx(1.0), pytest.approx(1.0))


def test_score_sample_prognostic_question():
    prediction = "The effusion will likely resolve within weeks."
    reference = "The pleural effusion is expected to resolve within a few weeks."
    scores = score_sample(record("prognostic", prediction, reference, task="prognostic"))
    assert scores == {"bleu4": pytest.approx(nltk_bleu4("the effusion will likely resolve within weeks .",
                                                        "the pleural effusion is expected to resolve within a few weeks .")),
                      "rougeL": pytest.approx(rouge_score_l(prediction, reference)),
                      "token_recall": pytest.approx(token_recall(prediction, reference)),
                      "token_recall_clipped": pytest.approx(token_recall_clipped(prediction, reference))}


GRAMMAR_REFERENCE = ("In 30 days, the pleural effusion is expected to resolve. "
                     "The cardiomegaly is expected to remain mild.")


@pytest.mark.parametrize("prediction, correct, f1, days, parsed", [
    (GRAMMAR_REFERENCE, 1, 1.0, 1, 1),
    # Order, case and spacing are free; the horizon is scored on its own.
    ("in 1 day,  the cardiomegaly is expected to remain mild. The pleural effusion is expected to resolve.",
     1, 1.0, 0, 1),
    ("In 30 days, the pleural effusion is expected to resolve.", 0, 2 / 3, 1, 1),  # a finding left out
    ("In 30 days, the pleural effusion is expected to persist. The cardiomegaly is expected to remain mild.",
     0, 0.5, 1, 1),  # the wrong course
    ("In 30 days, the cardiomegaly is expected to remain moderate. The pleural effusion is expected to resolve.",
     0, 0.5, 1, 1),  # the wrong level
    # A finding too many: 2 shared of 3 predicted and 2 expected.
    (GRAMMAR_REFERENCE + " A new atelectasis is expected to develop.", 0, 0.8, 1, 1),
    (GRAMMAR_REFERENCE + " It will be fine.", 0, 0.0, 0, 0),  # one sentence outside the grammar: nothing is read
    ("No change is expected in 30 days.", 0, 0.0, 1, 1),
])
def test_score_sample_reads_prognoses_in_the_offline_grammar(prediction, correct, f1, days, parsed):
    scores = score_sample(record("prognostic", prediction, GRAMMAR_REFERENCE, task="prognostic"))
    assert (scores["prognosis_correct"], scores["prognosis_days_correct"], scores["prognosis_parsed"]) == (
        correct, days, parsed)
    assert scores["prognosis_f1"] == pytest.approx(f1)


@pytest.mark.parametrize("prediction, f1", [
    ("No change is expected in 7 days.", 1.0),  # both sets empty: full agreement, whatever the horizon
    ("In 7 days, a new atelectasis is expected to develop.", 0.0),
    ("Nothing much.", 0.0),
])
def test_prognosis_f1_of_a_no_change_reference(prediction, f1):
    scores = score_sample(record("prognostic", prediction, "No change is expected in 30 days.", task="prognostic"))
    assert scores["prognosis_f1"] == f1


def test_a_reference_outside_the_grammar_is_counted_and_scored_by_overlap_alone():
    scores = score_sample(record("difference", "nothing has changed.", "worse", task="difference"))
    assert scores["difference_reference_parsed"] == 0
    assert "difference_correct" not in scores and "chexpert_added_accuracy" not in scores and "bleu4" in scores


def test_an_ambiguous_reference_level_scores_its_sets_and_matches_only_the_same_sentence():
    reference = ("the main image has an additional finding of atelectasis than the reference image. "
                 "the level of edema has changed from mild to moderate to severe.")
    same = score_sample(record("difference", reference, reference, task="difference"))
    other = score_sample(record("difference", reference.replace("to severe", "to large"), reference,
                                task="difference"))
    assert same["difference_reference_levels_ambiguous"] == 1 and same["difference_correct_with_levels"] == 1
    assert other["difference_correct"] == 1 and other["difference_correct_with_levels"] == 0


def test_score_sample_names_missing_record_keys():
    incomplete = record("presence", "yes", "yes")
    del incomplete["prediction"]
    with pytest.raises(ValueError, match="prediction"):
        score_sample(incomplete)


def test_every_scored_metric_has_a_signature():
    records = [record("difference", "nothing has changed.", "nothing has changed.", "difference"),
               record("difference", "", ADDED_EFFUSION_MISSING_ATELECTASIS, "difference"),
               record("presence", "yes", "yes"), record("level", "small", "small"),
               record("prognostic", "stable", "stable", task="prognostic"),
               record("prognostic", "No change is expected in 3 days.", "No change is expected in 3 days.",
                      task="prognostic"),
               record("worsen", "A", "A", task="mmxu")]
    names = {name for sample in records for name in score_sample(sample)}
    # The judge's scores come from evaluation.judge (eval.py judge=...), not from score_sample.
    assert names == set(METRIC_SIGNATURES) - {"judge_score", "judge_parsed"}


def test_change_f1_counts_added_and_missing_findings_separately():
    reference = ("the main image has additional findings of pleural effusion, and atelectasis than the reference "
                 "image. the main image is missing the finding of cardiomegaly than the reference image.")
    prediction = "the main image has an additional finding of pleural effusion than the reference image."
    scores = change_f1([(prediction, reference), ("nothing has changed.", "nothing has changed.")])
    assert scores["added"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores["missing"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    outside = ("the main image has an additional finding of edema than the reference image.", "worse")
    assert change_f1([(prediction, reference), ("nothing has changed.", "nothing has changed."), outside]) == scores


def test_corpus_metrics_pools_bleu_over_text_records_and_labels_over_difference_questions():
    added_effusion = "the main image has an additional finding of pleural effusion than the reference image. "
    records = [
        record("difference", "the main image has an additional finding of pleural effusion than the reference "
               "image.", added_effusion, task="difference"),
        record("difference", "nothing has changed.", added_effusion, task="difference"),
        record("presence", "yes", "yes"),
        record("worsen", "A", "A", task="mmxu"),
    ]
    metrics = corpus_metrics(records)
    # By hand, 13a tokens: the first answer is its 15-token reference; "nothing has changed ." (4 tokens)
    # matches "has" and "." of it; "yes" is its reference. n-gram matches pooled over the three:
    # 18/20, 14/17, 13/15, 12/13; 20 hypothesis tokens against 31 reference tokens.
    precisions = (18 / 20) * (14 / 17) * (13 / 15) * (12 / 13)
    assert metrics["corpus_bleu4"] == pytest.approx(math.exp(1 - 31 / 20) * precisions ** (1 / 4))
    assert (metrics["chexpert_added_precision"], metrics["chexpert_added_recall"],
            metrics["chexpert_added_support"]) == (1.0, 0.5, 2)
    assert metrics["chexpert_added_f1"] == pytest.approx(2 / 3)
    assert metrics["chexpert_missing_support"] == 0


def test_corpus_metrics_bleu_uses_the_enhanced_answer_where_a_record_has_one():
    enhanced = record("location", "The effusion is in the left lower lung.", "left lower lung")
    enhanced["answer"] = "The effusion is in the left lower lung."
    assert corpus_metrics([enhanced])["corpus_bleu4"] == pytest.approx(1.0)


def test_corpus_metrics_leaves_out_metrics_without_records():
    assert corpus_metrics([record("worsen", "A", "A", task="mmxu")]) == {}
    assert set(corpus_metrics([record("presence", "yes", "yes")])) == {"corpus_bleu4"}


def test_every_corpus_metric_has_a_signature():
    metrics = corpus_metrics([record("difference", "nothing has changed.", "nothing has changed.", "difference")])
    assert set(metrics) == set(CORPUS_METRIC_SIGNATURES)


def test_metric_signatures_name_the_library_version_tokenizer_and_smoothing():
    assert (f"sacrebleu nrefs:1|case:lc|eff:yes|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
            in METRIC_SIGNATURES["bleu4"])
    assert "smooth:none" in CORPUS_METRIC_SIGNATURES["corpus_bleu4"]
    assert "beta = 1 " in METRIC_SIGNATURES["rougeL"]
