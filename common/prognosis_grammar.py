"""The prognostic answer grammar of the offline builders (the ``rules`` backend and the synthetic
world's truth): written by ``describe``, read back by ``parse_prognosis``.

    In 30 days, the pleural effusion is expected to resolve. A new atelectasis is expected to develop.
    No change is expected in 5 days.

Answers from the ``llm`` backend are free text; only the overlap metrics apply to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.difference_grammar import split_levels


@dataclass(frozen=True)
class Expectation:
    """What one finding is expected to do: ``persist``, ``resolve``, ``develop``, ``increase`` or
    ``decrease`` (to ``level``), ``stay_resolved``, or ``keep_increasing``/``keep_decreasing``."""

    finding: str
    course: str
    level: str | None = None
    before: str | None = None


@dataclass(frozen=True)
class Prognosis:
    """A prognostic answer read back: the horizon it states and what it expects of each finding.
    ``parsed`` is False when the text is not entirely in the grammar; nothing else is then set."""

    days: int | None
    expectations: frozenset[Expectation]
    parsed: bool


def days_phrase(days: int) -> str:
    return "1 day" if days == 1 else f"{days} days"


def _clause(expectation: Expectation) -> str:
    name, level = expectation.finding, expectation.level
    return {
        "persist": f"the {name} is expected to remain {level}" if level else f"the {name} is expected to persist",
        "resolve": f"the {name} is expected to resolve",
        "develop": f"a new {name} is expected to develop",
        "increase": f"the {name} is expected to increase from {expectation.before} to {level}",
        "decrease": f"the {name} is expected to decrease from {expectation.before} to {level}",
        "stay_resolved": f"the {name} is not expected to recur",
        "keep_increasing": f"the {name} is expected to keep increasing",
        "keep_decreasing": f"the {name} is expected to keep decreasing",
    }[expectation.course]


def describe(days: int, expectations: list[Expectation]) -> str:
    """``In 30 days, the pleural effusion is expected to resolve. The cardiomegaly ...``"""
    if not expectations:
        return f"No change is expected in {days_phrase(days)}."
    clauses = [_clause(expectation) for expectation in expectations]
    sentences = [f"In {days_phrase(days)}, {clauses[0]}."] + [f"{c[0].upper()}{c[1:]}." for c in clauses[1:]]
    return " ".join(sentences)


# One pattern per clause of `_clause`; the first that matches the whole clause wins.
_CLAUSES = (
    (re.compile(r"the (?P<finding>.+?) is expected to (?P<course>increase|decrease) from (?P<levels>.+)"), None),
    (re.compile(r"the (?P<finding>.+?) is expected to remain (?P<level>.+)"), "persist"),
    (re.compile(r"the (?P<finding>.+?) is expected to persist"), "persist"),
    (re.compile(r"the (?P<finding>.+?) is expected to resolve"), "resolve"),
    (re.compile(r"a new (?P<finding>.+?) is expected to develop"), "develop"),
    (re.compile(r"the (?P<finding>.+?) is not expected to recur"), "stay_resolved"),
    (re.compile(r"the (?P<finding>.+?) is expected to keep (?P<course>increasing|decreasing)"), None),
)
_NO_CHANGE = re.compile(r"no change is expected in (?P<days>\d+) days?")
_FIRST = re.compile(r"in (?P<days>\d+) days?, (?P<clause>.+)")
_UNPARSED = Prognosis(None, frozenset(), parsed=False)


def _expectation(clause: str) -> Expectation | None:
    for pattern, course in _CLAUSES:
        match = pattern.fullmatch(clause)
        if not match:
            continue
        fields = match.groupdict()
        if course:
            return Expectation(fields["finding"], course, fields.get("level"))
        if fields["course"] in ("increasing", "decreasing"):
            return Expectation(fields["finding"], f"keep_{fields['course']}")
        levels = split_levels(fields["levels"])
        return Expectation(fields["finding"], fields["course"], levels[1], levels[0]) if levels else None
    return None


def parse_prognosis(text: str) -> Prognosis:
    """The horizon and the expectations of an answer in the grammar of ``describe`` (case, spacing
    and the order of the findings are free); an answer with any sentence outside it is unparsed."""
    sentences = [sentence.strip() for sentence in " ".join(text.lower().split()).split(".")]
    if len(sentences) < 2 or sentences[-1]:  # every sentence ends with a full stop
        return _UNPARSED
    sentences = sentences[:-1]
    no_change = _NO_CHANGE.fullmatch(sentences[0])
    if no_change:
        return Prognosis(int(no_change["days"]), frozenset(), parsed=True) if len(sentences) == 1 else _UNPARSED
    first = _FIRST.fullmatch(sentences[0])
    if not first:
        return _UNPARSED
    expectations = [_expectation(clause) for clause in (first["clause"], *sentences[1:])]
    if None in expectations:
        return _UNPARSED
    return Prognosis(int(first["days"]), frozenset(expectations), parsed=True)


def same_prognosis(predicted: Prognosis, expected: Prognosis) -> bool:
    """``prognosis_correct``: the prediction parses and expects the same of every finding (the stated
    horizon aside)."""
    return predicted.parsed and predicted.expectations == expected.expectations


def prognosis_f1(predicted: Prognosis, expected: Prognosis) -> float:
    """``prognosis_f1``: the F1 of the predicted expectations against the expected ones, each
    (finding, course, level, level before) counting as one item; partial credit where
    ``same_prognosis`` is all or nothing. Two empty sets ("no change is expected") agree fully; an
    unparsed prediction scores 0."""
    if not predicted.parsed:
        return 0.0
    if not predicted.expectations and not expected.expectations:
        return 1.0
    shared = len(predicted.expectations & expected.expectations)
    return 2 * shared / (len(predicted.expectations) + len(expected.expectations))
