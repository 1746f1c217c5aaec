"""Per-sample answer metrics: token recall, yes/no accuracy and MMXU single-choice accuracy, and
`score_sample`, which routes a prediction record to every metric that applies to it (difference
findings from `common.difference_grammar`).

Every metric scores one (prediction, reference) pair, because paired comparisons between models
(Wilcoxon signed-rank, McNemar) need per-sample values; `evaluation.report` averages them.
"""

from __future__ import annotations

import re
from collections import Counter

from common.difference_grammar import (  # noqa: F401  (re-exported: callers import them from here)
    DifferenceFindings,
    change_f1,
    difference_correct,
    parse_difference,
    same_change,
)
from common.prognosis_grammar import parse_prognosis, prognosis_f1, same_prognosis
from evaluation.findings import label_change_f1, label_changes, reference_label_changes
from evaluation.text_metrics import (
    CORPUS_BLEU_SIGNATURE,
    ROUGE_L_SIGNATURE,
    SENTENCE_BLEU_SIGNATURE,
    corpus_bleu4,
    rouge_l,
    sentence_bleu4,
)

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation, as copied into LLaVA-Med (llava/eval/eval_metrics/glossary.py)

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_THOUSANDS_SEPARATOR = re.compile(r"\d,\d")
# VQA writes `(?!<=\d)(\.)(?!\d)`: the look-behind meant to protect decimals is mistyped as a
# look-ahead, so in effect every period not followed by a digit goes. We reproduce the effect.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# VQA's table "expands" contractions by restoring the apostrophe (dont -> don't), so both spellings
# count as one unigram. Entries with capitals (Im, Ive, ...) are left out: they can never match
# after lower-casing, in the original either.
_CONTRACTIONS = dict(pair.split("=") for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've
    itll=it'll maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
    mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock
    oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
    shed've=she'd've she'dve=she'd've shouldve=should've shouldnt=shouldn't
    shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
    someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
    twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't
    whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
    whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
    wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
    y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
    youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def normalize_answer(text: str) -> str:
    """VQA-normalise an answer exactly as LLaVA-Med's `normalize_word` does.

    Punctuation is deleted or turned into a space (see below), periods not followed by a digit are
    dropped, text is lower-cased, number words become digits, articles are dropped and
    apostrophe-less contractions get their apostrophe back. One deliberate difference: the
    original passes `re.UNICODE` as `re.sub`'s *count*, so it strips only the first 32 periods;
    we strip them all.
    """
    has_thousands = _THOUSANDS_SEPARATOR.search(text) is not None
    stripped = text
    for mark in _PUNCTUATION:
        # VQA deletes a mark if it stands next to a space anywhere in the answer ("effusion - left",
        # "left, right") or if the answer holds a number like 1,000; otherwise the mark separates
        # words ("left-sided" -> "left sided").
        deleted = has_thousands or f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if deleted else " ")
    stripped = _PERIOD.sub("", stripped)
    words = []
    for word in stripped.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Open questions: token recall (LLaVA-Med `calculate_f1score`, recall part)

def _token_recall(prediction: str, reference: str, clip: bool) -> float:
    candidate = Counter(normalize_answer(prediction).split())
    expected = Counter(normalize_answer(reference).split())
    if not candidate or not expected:
        return 0.0
    true_positives = sum(min(count, expected[word]) if clip else count
                         for word, count in candidate.items() if word in expected)
    false_negatives = sum(count for word, count in expected.items() if word not in candidate)
    return true_positives / (true_positives + false_negatives) if true_positives else 0.0


def token_recall(prediction: str, reference: str) -> float:
    """LLaVA-Med unigram recall of the reference in the prediction.

    tp sums the prediction's counts of words that also occur in the reference, fn sums the
    reference's counts of words absent from the prediction; recall = tp / (tp + fn), 0 when either
    side is empty. Repeating a correct word raises the score: kept for comparability with the
    papers, see `token_recall_clipped`.
    """
    return _token_recall(prediction, reference, clip=False)


def token_recall_clipped(prediction: str, reference: str) -> float:
    """`token_recall` with each prediction count capped at the reference count.

    Only the repetition effect is removed: as in the reference definition, a reference word counts
    as recalled once the prediction contains it, and fn still counts absent words only.
    """
    return _token_recall(prediction, reference, clip=True)


# ---------------------------------------------------------------------------------------------
# Closed (yes/no) questions

_CLAUSE_BREAK = re.compile(r"[.,;:!?]|\b(?:and|but|or|however|although|though|whereas|while)\b")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATIONS = frozenset({"no", "not", "none", "nothing", "without", "absent", "negative", "neither",
                        "nor", "never", "isnt", "arent", "wasnt", "werent", "doesnt", "dont",
                        "hasnt", "havent"})
# A hedge makes the whole answer undecidable, even next to a negation or a yes ("cannot be
# excluded", "I don't know", "yes, probably").
_HEDGE = re.compile(r"\b(?:maybe|possibl[ey]|perhaps|probabl[ey]|(?:un)?likely|uncertain|unclear|unsure"
                    r"|not sure|not certain|not clear|questionable|equivocal|indeterminate|undetermined"
                    r"|inconclusive|unknown|not known|(?:do not|don't|dont|does not|doesn't) know"
                    r"|cannot|can not|can't|cant|unable|not able|impossible|difficult to|hard to|insufficient"
                    r"|not enough|no idea|no way to|not (?:determinable|assessable|evaluable|possible)"
                    r"|excluded)\b")
_AFFIRMATIONS = frozenset({"yes", "present", "seen", "visible", "evident", "noted", "identified",
                           "shows", "showing", "demonstrates", "positive", "evidence"})
_THERE_IS = re.compile(r"\bthere (?:is|are)\b|\bthere's\b")


def _clause_polarities(clause: str) -> set[str]:
    """What one clause says: "no" if it holds a negation (which outweighs an affirmation in it: "there
    is no effusion"), else "yes" if it affirms; and "yes" as well if it says the word yes, so that
    "yes/no" and "yes there is no effusion" read as both."""
    words = _WORD.findall(clause)
    polarities = {"yes"} if "yes" in words else set()
    if any(word in _NEGATIONS or word.endswith("n't") for word in words):
        polarities.add("no")
    elif _AFFIRMATIONS.intersection(words) or _THERE_IS.search(clause):
        polarities.add("yes")
    return polarities


def extract_yes_no(text: str) -> str | None:
    """Read a yes/no answer out of free text; None when it hedges or says both, never a guess.

    The text is split into clauses at punctuation and conjunctions; a clause is negative if it holds
    a negation ("there is no evidence of pneumothorax", "No, there is not."), positive if it affirms
    ("Yes, there is a small effusion"), and every clause with a polarity must agree: "yes and no",
    "yes or no" and "Yes, but no effusion." are None. A hedge anywhere ("I don't know", "unclear",
    "cannot be determined", "possibly") makes the answer None. Whole words only, so "normal" and
    "nodule" never read as "no".
    """
    text = text.lower().replace("\u2019", "'")
    if _HEDGE.search(text):
        return None
    polarities = set().union(*(_clause_polarities(clause) for clause in _CLAUSE_BREAK.split(text)))
    return polarities.pop() if len(polarities) == 1 else None


def is_closed(reference: str) -> bool:
    """Whether the reference answer is a bare yes/no (a closed question)."""
    return normalize_answer(reference) in ("yes", "no")


def _closed_reference(reference: str) -> str:
    expected = normalize_answer(reference)
    if expected not in ("yes", "no"):
        raise ValueError(f"closed accuracy needs a yes/no reference, got {reference!r}; "
                         "use is_closed() to route open questions to token recall")
    return expected


def closed_correct(prediction: str, reference: str) -> bool:
    """Headline closed accuracy: the extracted yes/no equals the reference.

    An answer the extractor cannot read is wrong (never dropped from the denominator).
    """
    return extract_yes_no(prediction) == _closed_reference(reference)


def closed_correct_llava_med(prediction: str, reference: str) -> bool:
    """LLaVA-Med's closed-question rule (`llava/eval/run_eval_batch.py`), quirks kept, so that our
    numbers can be set beside published LLaVA-Med-style closed accuracies.

    Both strings are VQA-normalised (`normalize_answer`) and the answer is right when the reference
    word is a substring of the prediction. Hence "nodule", "normal", "not", "know" and "cannot"
    count as "no" and "eyes" as "yes"; an answer holding both words ("yes and no") is right
    whichever the reference; and "none", which normalisation turns into "0", is not "no". Every
    sample stays in the denominator: LLaVA-Med's `run_eval.py` also drops wrong answers that
    contain "yes" or "no" from it, which we do not reproduce.
    """
    return _closed_reference(reference) in normalize_answer(prediction)


def exact_match(prediction: str, reference: str) -> bool:
    """D-Rax strict match: the normalised strings are equal, so "Yes, there is ..." is wrong."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ---------------------------------------------------------------------------------------------
# Single-choice questions (MMXU): the option letter, never guessed

_WHOLE_LETTER = re.compile(r"\s*\(?([A-Za-z])\)?\s*[.:)]?\s*")
# A letter names an option where it cannot be part of a word: in parentheses in either case
# ("(b)"), or upper case standing alone, quotes allowed (not in "CT", "B-lines", "3D", "A's").
_LETTER_MENTION = re.compile(r"\(([A-Za-z])\)|(?<![\w-])([A-Z])(?![\w-]|['\u2019]\w)")
# "A" before a word is the article ("A small effusion", "A CT is advised"), unless the word cannot
# follow an article ("A or B", "A is correct") or "option"/"choice" comes just before ("Option A is
# correct").
_ARTICLE_NEXT = re.compile(r"[ \t]+(?!(?:or|and|nor|is|was|because|since)\b)[A-Za-z]")
# An upper-case letter outside parentheses counts only where it cannot be a word of the sentence
# ("type B dissection", "Hepatitis C"): followed by punctuation or the end, after a cue ("the answer
# is B because ..."), before a verdict ("A is correct"), or listed with another letter ("B or C",
# read so that the two make the answer unparsed).
_CLOSED_AFTER = re.compile(r"[ \t]*(?:[^\w\s-]|$)")
_CUE_BEFORE = re.compile(r"\b(?i:answer|option|choice|pick|choose|select)\w*(?:\s+(?:is|would be))?\s*[:=(]?\s*['\"*]*$")
_VERDICT_AFTER = re.compile(r"\s+(?:is|was)\s+(?:correct|right|the (?:answer|best))\b")
_LISTED_AFTER = re.compile(r"\s*(?:,|/|\bor\b|\band\b|\bnor\b)\s*\(?[A-Z](?![\w-])")
_LISTED_BEFORE = re.compile(r"(?<![\w-])\(?[A-Z]\)?\s*(?:,|/|\bor|\band|\bnor)\s*\(?$")
_OPTION_WORD_BEFORE = re.compile(r"\b(?i:option|choice)\s*:?\s*$")
# A letter ruled out rather than chosen: "not A", "B rather than A", "neither A nor B", and the
# letters listed after such a word ("not A or B", "not A, B").
_NEGATED_LETTER = re.compile(r"\b(?i:not|never|neither|nor|isn't|isnt|than|instead of|except)\s+"
                             r"(?:(?i:option|choice)\s+)?(?:\(?[A-Z]\)?,?\s+(?:(?:or|nor)\s+)?)*\(?$")
# ... or ruled out just after: "C is wrong", "(C) is not correct".
_RULED_OUT_AFTER = re.compile(r"\)?\s+(?i:(?:is|was)\s+(?:not|incorrect|wrong|false|excluded)\b|isn't|isnt\b)")
# A negation at most one word before an option's text, within its clause ("has not increased").
_NEGATION_BEFORE = re.compile(r"\b(?:not|no|never|isn't|isnt|hasn't|hasnt|rather than|instead of)\s+(?:\w+\s+)?$")


def _named_letters(prediction: str, letters: list[str]) -> set[str]:
    """The option letters the answer names and does not rule out (see the patterns above)."""
    named = set()
    for match in _LETTER_MENTION.finditer(prediction):
        letter, before = (match[1] or match[2]).upper(), prediction[:match.start()]
        cue = _CUE_BEFORE.search(before)
        if match[2] and not (cue or _CLOSED_AFTER.match(prediction, match.end())
                             or _VERDICT_AFTER.match(prediction, match.end())
                             or _LISTED_AFTER.match(prediction, match.end()) or _LISTED_BEFORE.search(before)):
            continue
        article = (match[2] == "A" and _ARTICLE_NEXT.match(prediction, match.end())
                   and not (cue or _OPTION_WORD_BEFORE.search(before)))
        ruled_out = _NEGATED_LETTER.search(before) or _RULED_OUT_AFTER.match(prediction, match.end())
        if letter in letters and not article and not ruled_out:
            named.add(letter)
    return named


def _option_key(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").rstrip(" .").split())


def _named_option_texts(prediction: str, options: dict[str, str]) -> set[str]:
    """The letters of the options whose own text the answer contains as whole words, not negated
    just before ("not unchanged"). Longer texts are matched first and blanked, so that a shorter
    option inside one ("increased" in "not increased") is not read again."""
    remaining, named = _option_key(prediction), set()
    for letter, option in sorted(options.items(), key=lambda item: -len(item[1])):
        key = _option_key(option)
        if not key:
            continue
        for match in re.finditer(rf"(?<!\w){re.escape(key)}(?!\w)", remaining):
            if not _NEGATION_BEFORE.search(remaining[:match.start()]):
                named.add(letter)
        remaining = re.sub(rf"(?<!\w){re.escape(key)}(?!\w)", lambda match: " " * len(match[0]), remaining)
    return named


def extract_choice(prediction: str, options: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The option letter a free-text answer chooses, and how it was read; never a guess.

    - ``letter``: the whole answer is one letter, in either case (``C``, ``c``, ``C.``, ``(C)``,
      ``C:``, ``C)``): alone, even "a" cannot be the article.
    - ``mention``: the answer names exactly one option letter, and any option text in it is that
      option's (the others it may rule out). A letter counts in parentheses in either case, or in
      upper case where it cannot be a word of the sentence: followed by punctuation or the end ("B:
      improved", "Option D"), after a cue ("The answer is B because ..."), before a verdict ("A is
      correct"), or listed with another letter ("B or C", then unparsed); not in "type B
      dissection". "a" inside a sentence, and "A" before a word ("A small effusion"), is the
      article. Ruled-out letters do not count ("B, not A", "A is wrong").
    - ``text``: no letter, and exactly one option's own text, not negated ("It has resolved").
    - ``(None, "unparsed")``: anything else, e.g. two different letters ("B or C"), a letter and
      another option's text, two options' texts, or nothing.

    Letters are those of ``options`` (A-D without them); without options the text rule is off.
    """
    letters = sorted(options) if options else ["A", "B", "C", "D"]
    whole = _WHOLE_LETTER.fullmatch(prediction)
    if whole and whole[1].upper() in letters:
        return whole[1].upper(), "letter"
    named = _named_letters(prediction, letters)
    readings = named | (_named_option_texts(prediction, options) if options else set())
    if len(readings) != 1:
        return None, "unparsed"
    return readings.pop(), "mention" if named else "text"


def choice_correct(prediction: str, reference: str, options: dict[str, str] | None = None) -> bool:
    """MMXU accuracy: the extracted letter is the reference letter; an unparsed answer is wrong."""
    return extract_choice(prediction, options)[0] == reference


# ---------------------------------------------------------------------------------------------
# Per-sample scoring

# How each per-sample metric is computed. A scored record holds its metrics as top-level fields
# (`record | score_sample(record)`); `report.aggregate` averages exactly the fields named here.
METRIC_SIGNATURES = {
    "closed_accuracy": "yes/no references; negation-aware extractor on the prediction equals the "
                       "reference; unreadable answers are wrong and stay in the denominator",
    "closed_accuracy_llava_med": "yes/no references; LLaVA-Med's rule (llava/eval/run_eval_batch.py) "
                                 "with its quirks, for comparison with published LLaVA-Med-style "
                                 "numbers: the VQA-normalised reference is a substring of the "
                                 "VQA-normalised prediction, so 'nodule', 'normal', 'not', 'know' "
                                 "and 'cannot' count as 'no' and 'eyes' as 'yes', an answer holding "
                                 "both words is right either way, and 'none' (normalised to '0') is "
                                 "not 'no'; every sample stays in the denominator (run_eval.py's "
                                 "dropping of wrong yes/no answers is not reproduced)",
    "exact_match": "yes/no references; D-Rax strict match of the VQA-normalised prediction and "
                   "reference",
    "token_recall": "open diagnostic and prognostic questions, against the short reference; "
                    "LLaVA-Med unigram recall, LLaVA-Med VQA normalisation, whitespace tokens, "
                    "candidate counts (repetition inflates)",
    "token_recall_clipped": "as token_recall with candidate counts clipped to reference counts",
    "difference_correct": "difference questions; Medical-Diff-VQA grammar parse, added and missing "
                          "finding sets equal (pneumonia = infection), level changes ignored; "
                          "unparsed prediction is wrong",
    "difference_correct_with_levels": "as difference_correct and the (finding, reference level, "
                                      "main level) changes equal as sets",
    "difference_parsed": "difference questions; the prediction parses completely as the "
                         "Medical-Diff-VQA difference grammar",
    "difference_reference_parsed": "difference questions; 1 when the reference parses as the grammar; "
                                   "a reference that does not is counted here (mean below 1, n all) "
                                   "and scored by the overlap metrics alone",
    "difference_reference_levels_ambiguous": "difference questions with a parsed reference; 1 when one "
                                             "of its level sentences reads two ways even with the "
                                             "dataset's level words ('from mild to moderate to "
                                             "severe'): its added and missing sets are scored, and "
                                             "with levels it matches only the same sentence as written",
    "choice_accuracy": "mmxu single-choice questions; the letter read by extract_choice, which "
                       "never guesses (the whole answer one letter; else exactly one option named: "
                       "an upper-case letter standing alone or a letter in parentheses, not an "
                       "article 'A', not ruled out, and no other option's text; else exactly one "
                       "non-negated option text) equals the reference letter; unparsed answers "
                       "(two letters, 'B or C', several option texts) are wrong and stay in the "
                       "denominator",
    "choice_parsed": "mmxu single-choice questions; extract_choice read a letter",
    "judge_score": "open-ended questions (not yes/no, not single choice), with judge=...: the "
                   "reference-guided 1-10 LLM judge of evaluation/judge.py; mean over the parsed "
                   "judgements (parse and request failures have no score); judge model, prompt "
                   "version and failure counts in results['judge']",
    "judge_parsed": "as judge_score; 1 when the judge's rating was read (after at most one repair)",
    "bleu4": "diagnostic, difference and prognostic questions, against the record's `answer` (the "
             "enhanced long training target) where it has one, else its reference; per-sample "
             f"smoothed sentence BLEU-4 on a 0-1 scale, {SENTENCE_BLEU_SIGNATURE}",
    "rougeL": "as bleu4 for the questions and the reference text; per-sample ROUGE-L, "
              f"{ROUGE_L_SIGNATURE}",
    "chexpert_added_accuracy": "difference questions whose reference adds at least one CheXpert "
                               "label (an empty answer cannot score); the set of CheXpert labels "
                               "the prediction says were added equals the reference's "
                               "(evaluation.findings: grammar parse, else keyword rules; unmapped "
                               "findings ignored)",
    "chexpert_missing_accuracy": "as chexpert_added_accuracy for the labels said to be missing",
    "prognosis_correct": "prognostic questions whose reference is in the offline answer grammar "
                         "(rules and synthetic-truth backends); evaluation.prognosis parse, the "
                         "(finding, course, level) expectations equal as sets, the stated horizon "
                         "ignored; unparsed prediction is wrong",
    "prognosis_f1": "as prognosis_correct; per-sample F1 of the predicted (finding, course, level, "
                    "level before) expectations against the reference's (both empty: 1; unparsed "
                    "prediction: 0)",
    "prognosis_days_correct": "as prognosis_correct; the prediction states the reference's horizon "
                              "in days",
    "prognosis_parsed": "as prognosis_correct; the prediction parses completely as the grammar",
}

# Metrics of a whole group of records (`corpus_metrics`), not averages of per-sample values.
CORPUS_METRIC_SIGNATURES = {
    "corpus_bleu4": "the records bleu4 applies to, against the same texts; corpus BLEU-4 (n-gram "
                    f"counts and lengths pooled) on a 0-1 scale, {CORPUS_BLEU_SIGNATURE}",
    **{f"chexpert_{kind}_{score}": f"difference questions; micro {score} of the CheXpert labels "
                                   f"said to be {kind}, pooled over samples (evaluation.findings)"
       for kind in ("added", "missing") for score in ("precision", "recall", "f1", "support")},
}
# Metrics that score a sample 0 or 1 (an accuracy's per-sample value): paired comparisons of
# these also get McNemar's test, and plots show them as rates, not distributions.
ZERO_ONE_METRICS = frozenset({"closed_accuracy", "closed_accuracy_llava_med", "exact_match",
                              "difference_correct", "difference_correct_with_levels", "difference_parsed",
                              "difference_reference_parsed", "difference_reference_levels_ambiguous",
                              "choice_accuracy", "choice_parsed", "judge_parsed",
                              "chexpert_added_accuracy", "chexpert_missing_accuracy",
                              "prognosis_correct", "prognosis_days_correct", "prognosis_parsed"})

RECORD_KEYS = ("sample_id", "task", "question_type", "question", "prediction", "reference")


def _text_reference(record: dict) -> str:
    # Diagnostic records trained on enhanced answers carry the long target as `answer`; overlap
    # metrics compare with it, recall and accuracy with the short reference.
    return record.get("answer", record["reference"])


def _overlap_scores(record: dict) -> dict[str, float]:
    reference = _text_reference(record)
    return {"bleu4": sentence_bleu4(record["prediction"], reference),
            "rougeL": rouge_l(record["prediction"], reference)}


def _difference_scores(record: dict) -> dict[str, float]:
    prediction, reference = record["prediction"], record["reference"]
    expected = parse_difference(reference)
    if not expected.parsed:  # counted (difference_reference_parsed), never a reason to stop a run
        return {"difference_reference_parsed": 0}
    predicted = parse_difference(prediction)
    scores = {
        "difference_correct": int(same_change(predicted, expected, compare_levels=False)),
        "difference_correct_with_levels": int(same_change(predicted, expected, compare_levels=True)),
        "difference_parsed": int(predicted.parsed),
        "difference_reference_parsed": 1,
        "difference_reference_levels_ambiguous": int(bool(expected.ambiguous_levels)),
    }
    # Scored only where the reference names labels of the kind: most references add or remove no
    # CheXpert label, and an empty answer would match all of those.
    predicted_labels, expected_labels = label_changes(prediction), reference_label_changes(reference)
    for kind in ("added", "missing"):
        if getattr(expected_labels, kind):
            scores[f"chexpert_{kind}_accuracy"] = int(getattr(predicted_labels, kind) == getattr(expected_labels, kind))
    return scores


def _prognosis_scores(record: dict) -> dict[str, float]:
    expected = parse_prognosis(record["reference"])
    if not expected.parsed:  # a free-text reference (the llm backend): only overlap metrics apply
        return {}
    predicted = parse_prognosis(record["prediction"])
    return {"prognosis_correct": int(same_prognosis(predicted, expected)),
            "prognosis_f1": prognosis_f1(predicted, expected),
            "prognosis_days_correct": int(predicted.days == expected.days),
            "prognosis_parsed": int(predicted.parsed)}


def _check_record(record: dict) -> None:
    absent = [key for key in RECORD_KEYS if key not in record]
    if absent:
        raise ValueError(f"prediction record {record.get('sample_id')!r} lacks {absent}; "
                         f"every record needs {list(RECORD_KEYS)}")


def _recall_scores(prediction: str, reference: str) -> dict[str, float]:
    return {"token_recall": token_recall(prediction, reference),
            "token_recall_clipped": token_recall_clipped(prediction, reference)}


def score_sample(record: dict) -> dict[str, float]:
    """The metrics that apply to one prediction record (keys `RECORD_KEYS`), by name.

    - mmxu -> choice_accuracy, choice_parsed (option texts from the optional ``options``);
    - difference questions -> difference_reference_parsed; where the reference is in the grammar,
      difference_correct, difference_correct_with_levels, difference_parsed,
      difference_reference_levels_ambiguous, and chexpert_added_accuracy / chexpert_missing_accuracy
      where the reference adds / removes a CheXpert label; bleu4 and rougeL always;
    - prognostic -> bleu4, rougeL, token_recall, token_recall_clipped, and prognosis_correct,
      prognosis_f1, prognosis_days_correct, prognosis_parsed where the reference is in the offline grammar;
    - other (diagnostic) questions -> closed_accuracy, closed_accuracy_llava_med and exact_match for
      yes/no references, token_recall and token_recall_clipped otherwise; bleu4 and rougeL for both.

    ``reference`` must be the short original answer. bleu4 and rougeL compare with the optional
    ``answer`` (the enhanced long training target, present only where it differs from the
    reference) when there is one. Accuracies are 0/1.
    """
    _check_record(record)
    prediction, reference = record["prediction"], record["reference"]
    if record["task"] == "mmxu":
        letter, _ = extract_choice(prediction, record.get("options"))
        return {"choice_accuracy": int(letter == reference), "choice_parsed": int(letter is not None)}
    if record["question_type"] == "difference":
        return _difference_scores(record) | _overlap_scores(record)
    if record["task"] == "prognostic":
        return _prognosis_scores(record) | _overlap_scores(record) | _recall_scores(prediction, reference)
    if is_closed(reference):
        scores = {"closed_accuracy": int(closed_correct(prediction, reference)),
                  "closed_accuracy_llava_med": int(closed_correct_llava_med(prediction, reference)),
                  "exact_match": int(exact_match(prediction, reference))}
    else:
        scores = _recall_scores(prediction, reference)
    return scores | _overlap_scores(record)


def corpus_metrics(records: list[dict]) -> dict[str, float]:
    """Corpus-level metrics of one group of prediction records (e.g. one task and question type),
    by name (`CORPUS_METRIC_SIGNATURES`): corpus_bleu4 over the records bleu4 applies to, and the
    micro precision/recall/F1/support of added and missing CheXpert labels over the difference
    questions. Metrics with no record to apply to are left out."""
    for record in records:
        _check_record(record)
    metrics: dict[str, float] = {}
    texts = [record for record in records if record["task"] != "mmxu"]
    if texts:
        metrics["corpus_bleu4"] = corpus_bleu4([record["prediction"] for record in texts],
                                               [_text_reference(record) for record in texts])
    differences = [(record["prediction"], record["reference"]) for record in texts
                   if record["question_type"] == "difference"]
    if differences:
        for kind, scores in label_change_f1(differences).items():
            metrics.update({f"chexpert_{kind}_{name}": value for name, value in scores.items()})
    return metrics
