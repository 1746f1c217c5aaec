"""Medical-Diff-VQA (v1.0.1) -> Samples: diagnostic questions on one image, difference questions on two.

Policies (each counted in the returned ``LoadReport``, nothing dropped silently):
- the interval of a difference row is ``StudyDate(study) - StudyDate(ref)`` from ``mimic_all.csv``;
  a difference row whose reference is *later* than its main study is skipped (``ref_later``);
- exact duplicate difference rows (same study, reference and answer) are kept once (``duplicate``);
- diagnostic rows never use the reference (in v1.0.1 it can even be a later study);
- answers are stripped (the dataset's generator leaves a trailing space);
- ``test_policy="one_study_per_subject"`` (the LUMEN paper's test set) keeps, for the test split, the
  questions of one study per subject, drawn with a seeded generator (``other_study_of_subject``).
``sample_id`` is ``diffvqa-<row>``, ``row`` counting data rows of ``mimic_pair_questions.csv`` from 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from datamodules.mimic import days_between, image_path
from datamodules.records import Sample

SPLITS = ("train", "val", "test")
TEST_POLICIES = ("all", "one_study_per_subject")
QUESTION_TYPES = ("abnormality", "presence", "view", "location", "level", "type", "difference")
PAIR_COLUMNS = ["study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"]
STUDY_COLUMNS = ["subject_id", "study_id", "dicom_id", "study_date"]


@dataclass
class LoadReport:
    loaded: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        loaded = ", ".join(f"{n} {task}" for task, n in sorted(self.loaded.items())) or "nothing"
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"loaded {loaded}; skipped {skipped}"


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set paths.diffvqa to the Medical-Diff-VQA directory")
    table = pd.read_csv(path)
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (found {list(table.columns)})")
    return table


def one_study_per_subject(table: pd.DataFrame, seed: int) -> set[int]:
    """The LUMEN paper's test set: of the studies in ``table`` (columns subject_id, study_id), one
    per subject, drawn with a seeded generator."""
    studies = table[["subject_id", "study_id"]].drop_duplicates().sort_values(["subject_id", "study_id"])
    return set(studies.groupby("subject_id").sample(n=1, random_state=seed)["study_id"])


def load_diffvqa(
    diffvqa_dir: str | Path,
    mimic_root: str | Path,
    split: str,
    tasks: tuple[str, ...] = ("diagnostic", "difference"),
    use_prior: bool = True,
    test_policy: str = "all",
    seed: int = 0,
) -> tuple[list[Sample], LoadReport]:
    """Samples of one split. ``use_prior=False`` turns difference questions into single-image ones
    (the control that shows what the current image alone can answer)."""
    if split not in SPLITS:
        raise ValueError(f"unknown Medical-Diff-VQA split {split!r}: expected one of {SPLITS}")
    if test_policy not in TEST_POLICIES:
        raise ValueError(f"test_policy={test_policy!r}: expected one of {TEST_POLICIES}")
    diffvqa_dir = Path(diffvqa_dir)
    studies_path = diffvqa_dir / "mimic_all.csv"
    questions_path = diffvqa_dir / "mimic_pair_questions.csv"
    studies = {
        row.study_id: row for row in _read_csv(studies_path, STUDY_COLUMNS).itertuples(index=False)
    }
    questions = _read_csv(questions_path, PAIR_COLUMNS)
    kept_studies = None
    if split == "test" and test_policy == "one_study_per_subject":
        kept_studies = one_study_per_subject(questions[questions["split"] == "test"], seed)

    def study(study_id: int, row: int, column: str):
        if study_id not in studies:
            raise KeyError(f"{questions_path} row {row}, field {column}: study {study_id} is not in {studies_path}")
        return studies[study_id]

    report = LoadReport()
    samples: list[Sample] = []
    seen_differences: set[tuple[int, int, str]] = set()
    for row, question in enumerate(questions.itertuples(index=False)):
        if question.split != split:
            continue
        if question.question_type not in QUESTION_TYPES:
            raise ValueError(f"{questions_path} row {row}, field question_type: unknown value {question.question_type!r}")
        task = "difference" if question.question_type == "difference" else "diagnostic"
        if task not in tasks:
            continue
        if kept_studies is not None and question.study_id not in kept_studies:
            report.skipped["other_study_of_subject"] += 1
            continue
        answer = str(question.answer).strip()
        current = study(question.study_id, row, "study_id")
        prior_image = interval_days = prior_study_id = None
        if task == "difference":
            key = (question.study_id, question.ref_id, answer)
            if key in seen_differences:
                report.skipped["duplicate"] += 1
                continue
            seen_differences.add(key)
            reference = study(question.ref_id, row, "ref_id")
            days = days_between(current.study_date, reference.study_date)
            if days < 0:
                report.skipped["ref_later"] += 1
                continue
            if use_prior:
                prior_study_id = int(question.ref_id)
                prior_image = image_path(mimic_root, reference.subject_id, question.ref_id, reference.dicom_id)
                interval_days = float(days)
        samples.append(
            Sample(
                sample_id=f"diffvqa-{row}",
                task=task,
                question_type=question.question_type,
                question=str(question.question),
                answer=answer,
                image=image_path(mimic_root, current.subject_id, question.study_id, current.dicom_id),
                prior_image=prior_image,
                interval_days=interval_days,
                subject_id=int(question.subject_id),
                study_id=int(question.study_id),
                prior_study_id=prior_study_id,
            )
        )
        report.loaded[task] += 1
    return samples, report
