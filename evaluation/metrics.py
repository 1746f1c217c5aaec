"""Per-sample answer metrics: token recall, yes/no accuracy, Diff-VQA difference findings and MMXU
single-choice accuracy.

Every metric scores one (prediction, reference) pair, because paired comparisons between models
(Wilcoxon signed-rank, McNemar) need per-sample values; `evaluation.report` averages them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

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
# A hedge makes the whole answer undecidable, even next to a negation ("cannot be excluded").
_HEDGE = re.compile(r"\b(?:maybe|possibl[ey]|perhaps|probabl[ey]|(?:un)?likely|uncertain|unclear"
                    r"|unsure|not sure|questionable|equivocal|indeterminate|cannot|can't|cant"
                    r"|excluded)\b")
_AFFIRMATIONS = frozenset({"yes", "present", "seen", "visible", "evident", "noted", "identified",
                           "shows", "showing", "demonstrates", "positive", "evidence"})
_THERE_IS = re.compile(r"\bthere (?:is|are)\b|\bthere's\b")


def _clause_polarity(clause: str) -> str | None:
    if _HEDGE.search(clause):
        return "uncertain"
    words = _WORD.findall(clause)
    if any(word in _NEGATIONS or word.endswith("n't") for word in words):
        return "no"
    if _AFFIRMATIONS.intersection(words) or _THERE_IS.search(clause):
        return "yes"
    return None


def extract_yes_no(text: str) -> str | None:
    """Read a yes/no answer out of free text; None when it says neither or both.

    A leading "yes"/"no" is the answer ("No, there is no effusion"). Otherwise each clause (split at
    punctuation and conjunctions) is negative if it holds a negation ("there is no evidence of
    pneumothorax"), positive if it affirms ("there is a small effusion"), and all clauses with a
    polarity must agree. Whole words only, so "normal" and "nodule" never read as "no".
    """
    text = text.lower().replace("\u2019", "'")
    words = _WORD.findall(text)
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    polarities = {_clause_polarity(clause) for clause in _CLAUSE_BREAK.split(text)} - {None}
    if len(polarities) == 1 and "uncertain" not in polarities:
        return polarities.pop()
    return None


def is_closed(reference: str) -> bool:
    """Whether the reference answer is a bare yes/no (a closed question)."""
    return normalize_answer(reference) in ("yes", "no")


def closed_correct(prediction: str, reference: str) -> bool:
    """Headline closed accuracy: the extracted yes/no equals the reference.

    An answer the extractor cannot read is wrong (never dropped from the denominator).
    """
    expected = normalize_answer(reference)
    if expected not in ("yes", "no"):
        raise ValueError(f"closed_correct needs a yes/no reference, got {reference!r}; "
                         "use is_closed() to route open questions to token recall")
    return extract_yes_no(prediction) == expected


def exact_match(prediction: str, reference: str) -> bool:
    """D-Rax strict match: the normalised strings are equal, so "Yes, there is ..." is wrong."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ---------------------------------------------------------------------------------------------
# Difference questions: the Medical-Diff-VQA answer grammar

@dataclass(frozen=True)
class DifferenceFindings:
    """What a difference answer says changed from the reference (prior) to the main image.

    `level_changes` holds (finding, reference level, main level). `parsed` is False when the text
    is not entirely in the grammar; the sets are then empty, never a partial guess.
    """

    added: frozenset[str]
    missing: frozenset[str]
    level_changes: tuple[tuple[str, str, str], ...]
    parsed: bool


_UNPARSED = DifferenceFindings(frozenset(), frozenset(), (), parsed=False)
_NO_CHANGE = "nothing has changed"
_ADDED = re.compile(r"the main image has (?:an additional finding|additional findings) of "
                    r"(?P<findings>.+) than the reference image")
_MISSING = re.compile(r"the main image is missing the findings? of (?P<findings>.+) "
                      r"than the reference image")
_LEVEL = re.compile(r"the level of (?P<finding>.+?) has changed from (?P<levels>.+)")
# The generator writes "a, b, and c" and, for two items, "a, and b"; people write "a and b" and
# "a, b and c". No official finding name contains a comma or the word "and".
_LIST_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
# Multi-word levels from Diff-VQA's level_lib.csv: the only ones that contain "to".
_COMPOUND_LEVELS = ("mild to moderate", "moderate to large", "moderate to severe")


def _canonical_finding(name: str) -> str:
    # Diff-VQA's generator treats pneumonia and infection as one finding when it computes
    # added/missing, so an answer naming either means the same.
    name = name.strip()
    return "pneumonia" if name == "infection" else name


def _findings(listed: str) -> frozenset[str] | None:
    names = [_canonical_finding(name) for name in _LIST_SEPARATOR.split(listed)]
    return None if "" in names else frozenset(names)


def _is_level(phrase: str) -> bool:
    for compound in _COMPOUND_LEVELS:
        phrase = phrase.replace(compound, "")
    return "to" not in phrase.split()


def _split_levels(levels: str) -> tuple[str, str] | None:
    """Split "A to B" where A or B may be "moderate to large"; None unless exactly one way fits."""
    words = levels.split(" ")
    splits = [(" ".join(words[:i]), " ".join(words[i + 1:]))
              for i, word in enumerate(words) if word == "to" and 0 < i < len(words) - 1]
    valid = [split for split in splits if _is_level(split[0]) and _is_level(split[1])]
    return valid[0] if len(valid) == 1 else None


def parse_difference(text: str) -> DifferenceFindings:
    """Parse a Medical-Diff-VQA difference answer; case and spacing are free, every sentence must
    be one of the grammar's forms, and "nothing has changed." must stand alone."""
    sentences = [sentence.strip() for sentence in " ".join(text.lower().split()).split(".")]
    sentences = [sentence for sentence in sentences if sentence]
    if sentences == [_NO_CHANGE]:
        return DifferenceFindings(frozenset(), frozenset(), (), parsed=True)
    added: set[str] = set()
    missing: set[str] = set()
    level_changes = []
    for sentence in sentences:
        listed = _ADDED.fullmatch(sentence) or _MISSING.fullmatch(sentence)
        level = _LEVEL.fullmatch(sentence)
        if listed:
            findings = _findings(listed["findings"])
            if findings is None:
                return _UNPARSED
            (added if listed.re is _ADDED else missing).update(findings)
        elif level and (levels := _split_levels(level["levels"])):
            level_changes.append((_canonical_finding(level["finding"]), *levels))
        else:
            return _UNPARSED
    return DifferenceFindings(frozenset(added), frozenset(missing), tuple(level_changes),
                              parsed=bool(sentences))


def _parse_reference_difference(reference: str) -> DifferenceFindings:
    findings = parse_difference(reference)
    if not findings.parsed:
        raise ValueError(f"reference {reference!r} is not a Medical-Diff-VQA difference answer; "
                         "score difference questions against the short original answer")
    return findings


def _same_change(predicted: DifferenceFindings, expected: DifferenceFindings,
                 compare_levels: bool) -> bool:
    if not predicted.parsed:
        return False
    same = predicted.added == expected.added and predicted.missing == expected.missing
    if compare_levels:
        same = same and set(predicted.level_changes) == set(expected.level_changes)
    return same


def difference_correct(prediction: str, reference: str, *, compare_levels: bool = False) -> bool:
    """Whether the prediction names the same added and the same missing findings as the reference.

    Level changes are ignored by default: the generator lifts levels as adjectives from the two
    free-text reports ("small" in one, "mild" in the other reads as a change), level sentences are
    a few percent of all clauses, and finding-level Diff-VQA scoring (MMXU appendix) uses
    added/missing only. With `compare_levels=True` the (finding, from, to) changes must match too;
    use that for the location-conditioned questions, whose references are level-only and which
    the default would count right for any answer that adds and removes nothing. An unparseable
    prediction is wrong; an unparseable reference raises ValueError.
    """
    return _same_change(parse_difference(prediction), _parse_reference_difference(reference),
                        compare_levels)


def change_f1(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Micro precision/recall/F1 of the added and of the missing findings over (prediction,
    reference) pairs of difference answers: partial credit where ``difference_correct`` gives none.
    Unparseable predictions count as naming no finding."""
    counts = {"added": [0, 0, 0], "missing": [0, 0, 0]}  # true positives, false positives, false negatives
    for prediction, reference in pairs:
        predicted, expected = parse_difference(prediction), _parse_reference_difference(reference)
        for kind, (tp, fp, fn) in counts.items():
            found, wanted = getattr(predicted, kind), getattr(expected, kind)
            counts[kind] = [tp + len(found & wanted), fp + len(found - wanted), fn + len(wanted - found)]
    scores = {}
    for kind, (tp, fp, fn) in counts.items():
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[kind] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return scores


# ---------------------------------------------------------------------------------------------
# Single-choice questions (MMXU): the option letter, never guessed

_WHOLE_LETTER = re.compile(r"\s*\(?([A-Za-z])\)?\s*[.:)]?\s*")
_LETTER_CUE = re.compile(r"\b(?:answer|option|choice)(?:\s+(?:is|would be|:))?\s*[:(]?\s*\(?([A-Z])\b(?![a-z'])",
                         re.IGNORECASE)
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z'])\(?([A-Z])\)?(?![A-Za-z'])")
_ARTICLE = re.compile(r"\bA\s+(?!(?:and|or)\b)[a-z]")  # "A small effusion": the article, not option A
# A negation at most one word before an option's text, within its clause ("has not increased").
_NEGATION_BEFORE = re.compile(r"\b(?:not|no|never|isn't|isnt|hasn't|hasnt|rather than|instead of)\s+(?:\w+\s+)?$")


def _option_key(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").rstrip(" .").split())


def extract_choice(prediction: str, options: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The option letter a free-text answer chooses, and how it was read: ``letter`` (the whole
    answer is one letter: ``C``, ``C.``, ``(C)``, ``C:``), ``cue`` ("the answer is C", "option C";
    the last one wins), ``standalone`` (exactly one option letter standing alone, a leading article
    "A small ..." is a word), ``text`` (exactly one option's text in the answer, longer texts first,
    skipping those negated just before: "not unchanged"), or ``(None, "unparsed")``.

    Letters are those of ``options`` (A-D without them); without options the text rule is off.
    """
    letters = sorted(options) if options else ["A", "B", "C", "D"]
    whole = _WHOLE_LETTER.fullmatch(prediction)
    if whole and whole[1].upper() in letters:
        return whole[1].upper(), "letter"
    cues = [match[1].upper() for match in _LETTER_CUE.finditer(prediction) if match[1].upper() in letters]
    if cues:
        return cues[-1], "cue"
    text = _ARTICLE.sub(" ", prediction)
    standalone = {match[1] for match in _STANDALONE_LETTER.finditer(text) if match[1] in letters}
    if len(standalone) == 1:
        return standalone.pop(), "standalone"
    if options:
        remaining, found = _option_key(prediction), set()
        for letter, option in sorted(options.items(), key=lambda item: -len(item[1])):
            key = _option_key(option)
            start = remaining.find(key) if key else -1
            if start >= 0:
                if not _NEGATION_BEFORE.search(remaining[:start]):
                    found.add(letter)
                # Blanked so that a shorter option inside it ("increased" in "not increased") is not read.
                remaining = remaining[:start] + " " * len(key) + remaining[start + len(key):]
        if len(found) == 1:
            return found.pop(), "text"
    return None, "unparsed"


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
    "exact_match": "yes/no references; D-Rax strict match of the VQA-normalised prediction and "
                   "reference",
    "token_recall": "open non-difference references; LLaVA-Med unigram recall, LLaVA-Med VQA "
                    "normalisation, whitespace tokens, candidate counts (repetition inflates)",
    "token_recall_clipped": "as token_recall with candidate counts clipped to reference counts",
    "difference_correct": "difference questions; Medical-Diff-VQA grammar parse, added and missing "
                          "finding sets equal (pneumonia = infection), level changes ignored; "
                          "unparsed prediction is wrong",
    "difference_correct_with_levels": "as difference_correct and the (finding, reference level, "
                                      "main level) changes equal as sets",
    "difference_parsed": "difference questions; the prediction parses completely as the "
                         "Medical-Diff-VQA difference grammar",
    "choice_accuracy": "mmxu single-choice questions; the letter read by extract_choice (whole "
                       "letter, answer/option cue, one standalone letter, one non-negated option "
                       "text) equals the reference letter; unparsed answers are wrong and stay in "
                       "the denominator",
    "choice_parsed": "mmxu single-choice questions; extract_choice read a letter",
    "judge_score": "open-ended questions (not yes/no, not single choice), with judge=...: the "
                   "reference-guided 1-10 LLM judge of evaluation/judge.py; mean over the parsed "
                   "judgements (parse and request failures have no score); judge model, prompt "
                   "version and failure counts in results['judge']",
    "judge_parsed": "as judge_score; 1 when the judge's rating was read (after at most one repair)",
}
# Metrics that score a sample 0 or 1 (an accuracy's per-sample value): paired comparisons of
# these also get McNemar's test, and plots show them as rates, not distributions.
ZERO_ONE_METRICS = frozenset({"closed_accuracy", "exact_match", "difference_correct",
                              "difference_correct_with_levels", "difference_parsed",
                              "choice_accuracy", "choice_parsed", "judge_parsed"})

RECORD_KEYS = ("sample_id", "task", "question_type", "question", "prediction", "reference")


def score_sample(record: dict) -> dict[str, float]:
    """The metrics that apply to one prediction record (keys `RECORD_KEYS`), by name.

    mmxu questions -> choice_accuracy, choice_parsed (option texts from the record's optional
    ``options``); difference questions -> difference_correct, difference_correct_with_levels, difference_parsed;
    yes/no references -> closed_accuracy, exact_match; other references -> token_recall,
    token_recall_clipped. Accuracies are 0/1. The reference must be the short original answer.
    """
    absent = [key for key in RECORD_KEYS if key not in record]
    if absent:
        raise ValueError(f"prediction record {record.get('sample_id')!r} lacks {absent}; "
                         f"every record needs {list(RECORD_KEYS)}")
    prediction, reference = record["prediction"], record["reference"]
    if record["task"] == "mmxu":
        letter, _ = extract_choice(prediction, record.get("options"))
        return {"choice_accuracy": int(letter == reference), "choice_parsed": int(letter is not None)}
    if record["question_type"] == "difference":
        try:
            expected = _parse_reference_difference(reference)
        except ValueError as error:
            raise ValueError(f"sample {record['sample_id']}: {error}") from error
        predicted = parse_difference(prediction)
        return {
            "difference_correct": int(_same_change(predicted, expected, compare_levels=False)),
            "difference_correct_with_levels": int(_same_change(predicted, expected,
                                                               compare_levels=True)),
            "difference_parsed": int(predicted.parsed),
        }
    if is_closed(reference):
        return {"closed_accuracy": int(closed_correct(prediction, reference)),
                "exact_match": int(exact_match(prediction, reference))}
    return {"token_recall": token_recall(prediction, reference),
            "token_recall_clipped": token_recall_clipped(prediction, reference)}
