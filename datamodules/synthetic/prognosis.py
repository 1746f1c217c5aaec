"""Ground-truth prognostic questions of the simulated world: for each Medical-Diff-VQA difference
row, the most likely state of every finding ``days`` after the current study, computed from the
sites' Markov chains, in the prognostic answer grammar (``datamodules.prognostic``).

The chains are Markov, so the prognosis depends on the current study's levels and the asked days
only: the prior study helps a model read the current state, it does not change the truth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.prognostic import Expectation, ask, describe, draw_question
from datamodules.synthetic.population import FINDINGS, Finding, Study, transition

BACKEND = "synthetic-truth"
TRUTH_VERSION = "chains-v1"


def expected_levels(study: Study, days: int) -> dict[str, int]:
    """Finding -> its most likely highest level over sites ``days`` after ``study`` (0: absent)."""
    expected = {}
    for finding in FINDINGS:
        chain = transition(finding, days)
        expected[finding.name] = max(int(np.argmax(chain[study.level(finding, site)])) for site in finding.sites)
    return expected


def _level_name(finding: Finding, level: int) -> str | None:
    return finding.level_name(level) if finding.levels else None


def prognosis(study: Study, days: int) -> str:
    """The expected course of every finding present now, and of any finding expected to appear."""
    expectations = []
    now = {finding.name: level for finding, (level, _) in study.findings.items()}
    for finding in FINDINGS:
        before, after = now.get(finding.name, 0), expected_levels(study, days)[finding.name]
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
            "answer": prognosis(current, days), "backend": BACKEND, "model": None, "prompt_version": TRUTH_VERSION,
        })
    return records
