"""Medical-Diff-VQA difference answers: the answer grammar parsed into added, missing and
level-changed findings, and finding-level scores of a prediction against its reference."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DifferenceFindings:
    """What a difference answer says changed from the reference (prior) to the main image.

    `level_changes` holds (finding, reference level, main level). `ambiguous_levels` holds (finding,
    the levels as written) for a level sentence that reads two ways even with the dataset's level
    words ("from mild to moderate to severe": mild to moderate-to-severe, or mild-to-moderate to
    severe); its finding's change is known, its levels are not. `parsed` is False when the text is not
    entirely in the grammar; the sets are then empty, never a partial guess.
    """

    added: frozenset[str]
    missing: frozenset[str]
    level_changes: tuple[tuple[str, str, str], ...]
    parsed: bool
    ambiguous_levels: frozenset[tuple[str, str]] = frozenset()


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
# Diff-VQA's level words from least to most (level_lib.csv); the multi-word ones are the only ones with "to".
LEVELS = ("minimal", "trace", "tiny", "small", "mild", "mild to moderate", "moderate", "moderate to large",
          "moderate to severe", "large", "severe", "massive")
_COMPOUND_LEVELS = tuple(level for level in LEVELS if " to " in level)


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


def level_readings(levels: str) -> list[tuple[str, str]]:
    """The ways "A to B" splits, where A or B may be "moderate to large": every split whose two sides
    are levels. Two fit only where a compound level word meets another ("mild to moderate to severe"),
    and then both readings are made of Diff-VQA's level words, so the level list cannot choose."""
    words = levels.split(" ")
    splits = [(" ".join(words[:i]), " ".join(words[i + 1:]))
              for i, word in enumerate(words) if word == "to" and 0 < i < len(words) - 1]
    return [split for split in splits if _is_level(split[0]) and _is_level(split[1])]


def split_levels(levels: str) -> tuple[str, str] | None:
    """Split "A to B" (``level_readings``); None unless exactly one way fits."""
    readings = level_readings(levels)
    return readings[0] if len(readings) == 1 else None


def parse_difference(text: str) -> DifferenceFindings:
    """Parse a Medical-Diff-VQA difference answer; case and spacing are free, every sentence must
    be one of the grammar's forms, and "nothing has changed." must stand alone."""
    sentences = [sentence.strip() for sentence in " ".join(text.lower().split()).split(".")]
    sentences = [sentence for sentence in sentences if sentence]
    if sentences == [_NO_CHANGE]:
        return DifferenceFindings(frozenset(), frozenset(), (), parsed=True)
    added: set[str] = set()
    missing: set[str] = set()
    level_changes, ambiguous = [], set()
    for sentence in sentences:
        listed = _ADDED.fullmatch(sentence) or _MISSING.fullmatch(sentence)
        level = _LEVEL.fullmatch(sentence)
        if listed:
            findings = _findings(listed["findings"])
            if findings is None:
                return _UNPARSED
            (added if listed.re is _ADDED else missing).update(findings)
        elif level and (readings := level_readings(level["levels"])):
            finding = _canonical_finding(level["finding"])
            if len(readings) == 1:
                level_changes.append((finding, *readings[0]))
            else:
                ambiguous.add((finding, level["levels"]))
        else:
            return _UNPARSED
    return DifferenceFindings(frozenset(added), frozenset(missing), tuple(level_changes),
                              parsed=bool(sentences), ambiguous_levels=frozenset(ambiguous))


def parse_reference_difference(reference: str) -> DifferenceFindings:
    findings = parse_difference(reference)
    if not findings.parsed:
        raise ValueError(f"reference {reference!r} is not a Medical-Diff-VQA difference answer; "
                         "score difference questions against the short original answer")
    return findings


def same_change(predicted: DifferenceFindings, expected: DifferenceFindings,
                 compare_levels: bool) -> bool:
    if not predicted.parsed:
        return False
    same = predicted.added == expected.added and predicted.missing == expected.missing
    if compare_levels:
        # A level sentence that reads two ways matches the same sentence, as written, and nothing else.
        same = (same and set(predicted.level_changes) == set(expected.level_changes)
                and predicted.ambiguous_levels == expected.ambiguous_levels)
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
    return same_change(parse_difference(prediction), parse_reference_difference(reference),
                        compare_levels)


def micro_scores(pairs: list[tuple[frozenset[str], frozenset[str]]]) -> dict[str, float]:
    """Micro precision, recall and F1 of predicted against expected sets, pooled over (predicted,
    expected) pairs; 0 where a ratio has no denominator. ``support`` counts the expected items."""
    true_positives = sum(len(found & wanted) for found, wanted in pairs)
    false_positives = sum(len(found - wanted) for found, wanted in pairs)
    false_negatives = sum(len(wanted - found) for found, wanted in pairs)
    predicted, support = true_positives + false_positives, true_positives + false_negatives
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def change_f1(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Micro precision/recall/F1 of the added and of the missing findings over (prediction,
    reference) pairs of difference answers: partial credit where ``difference_correct`` gives none.
    Unparseable predictions count as naming no finding; pairs whose reference is not in the grammar
    are left out."""
    parsed = [(parse_difference(prediction), expected) for prediction, reference in pairs
              if (expected := parse_difference(reference)).parsed]
    return {kind: micro_scores([(getattr(predicted, kind), getattr(expected, kind))
                                for predicted, expected in parsed])
            for kind in ("added", "missing")}
