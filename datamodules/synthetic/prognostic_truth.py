"""Ground-truth prognostic questions of the simulated world: for each Medical-Diff-VQA difference
row, the most likely state of every finding ``days`` after the current study, in the prognostic
answer grammar (``common.prognosis_grammar``).

The truth is the best forecast from what a two-image model is shown: each site's chain state is
inferred from its level at the prior study (drawn from the long-run distribution) and at the
current one, then carried ``days`` forward. Because a finding's course (acute or chronic) is hidden
and shows in its history, the prior study changes the answer: a new finding is expected to resolve
where the same finding persisting since the prior study is expected to stay. ``prognosis`` without
a prior gives the best forecast from the current study alone, the ceiling of a one-image model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.prognosis_grammar import Expectation, describe
from datamodules.prognostic_builder import ask, draw_question
from datamodules.synthetic.population import FINDINGS, Finding, Study, stationary, transition

BACKEND = "synthetic-truth"
TRUTH_VERSION = "courses-v2"  # v1: Markov chains over levels; v2: hidden acute/chronic courses


def forecast(finding: Finding, current: int, days: int, prior: int | None = None, interval: int = 0) -> np.ndarray:
    """Probability of each level of one site ``days`` after a study that saw it at level ``current``,
    given its level ``prior`` at a study ``interval`` days before (None: the current study alone)."""
    levels = finding.state_levels
    now = stationary(finding) * (levels == current) if prior is None else (
        (stationary(finding) * (levels == prior)) @ transition(finding, interval) * (levels == current))
    if not now.sum() > 0:
        raise ValueError(f"{finding.name}: level {prior} then {current} after {interval} days is impossible")
    ahead = (now / now.sum()) @ transition(finding, days)
    return np.bincount(levels, weights=ahead, minlength=finding.top_level + 1)


def expected_levels(current: Study, days: int, prior: Study | None = None) -> dict[str, int]:
    """Finding -> its most likely highest level over sites ``days`` after ``current`` (0: absent)."""
    interval = (current.date - prior.date).days if prior else 0
    return {
        finding.name: max(
            int(np.argmax(forecast(finding, current.level(finding, site), days,
                                   prior.level(finding, site) if prior else None, interval)))
            for site in finding.sites)
        for finding in FINDINGS
    }


def _level_name(finding: Finding, level: int) -> str | None:
    return finding.level_name(level) if finding.levels else None


def prognosis(current: Study, days: int, prior: Study | None = None) -> str:
    """The expected course of every finding present now, and of any finding expected to appear."""
    expectations = []
    now = {finding.name: level for finding, (level, _) in current.findings.items()}
    expected = expected_levels(current, days, prior)
    for finding in FINDINGS:
        before, after = now.get(finding.name, 0), expected[finding.name]
        if before and not after:
            expectations.append(Expectation(finding.name, "resolve"))
        elif after and not before:
            expectations.append(Expectation(finding.name, "develop"))
        elif before and after == before:
            expectations.append(Expectation(finding.name, "persist", _level_name(finding, after)))
        elif before:
            course = "increase" if after > before else "decrease"
            expectations.append(Expectation(finding.name, course, _level_name(finding, after), _level_name(finding, before)))
    return describe(days, expectations)


def prognostic_records(studies: list[Study], questions: pd.DataFrame, seed: int) -> list[dict]:
    """One record per difference row of ``questions`` (the world's ``mimic_pair_questions.csv``),
    in the prognostic JSONL schema; exact duplicate rows are kept once, as the Diff-VQA adapter does."""
    by_id = {study.study_id: study for study in studies}
    records, seen = [], set()
    for row, question in enumerate(questions.itertuples(index=False)):
        key = (question.study_id, question.ref_id, question.answer)
        if question.question_type != "difference" or key in seen:
            continue
        seen.add(key)
        current, prior = by_id[question.study_id], by_id[question.ref_id]
        template_id, days = draw_question(seed, row)
        records.append({
            "id": f"prognostic-{row}", "source_sample_id": f"diffvqa-{row}", "source_row": row,
            "split": question.split, "subject_id": current.subject_id, "study_id": current.study_id,
            "ref_id": prior.study_id, "interval_days": float((current.date - prior.date).days),
            "difference_question": question.question, "difference_answer": question.answer,
            "template_id": template_id, "days": days, "question": ask(template_id, days),
            "answer": prognosis(current, days, prior), "backend": BACKEND, "model": None, "prompt_version": TRUTH_VERSION,
        })
    return records
