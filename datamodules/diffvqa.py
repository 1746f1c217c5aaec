"""Medical-Diff-VQA (v1.0.1) -> Samples: diagnostic questions on one image, difference questions on two.

Policies (each counted in the returned ``LoadReport``, nothing dropped silently):
- the interval of a difference row is ``StudyDate(study) - StudyDate(ref)`` from ``mimic_all.csv``;
  a difference row whose reference is *later* than its main study is skipped (``ref_later``);
- exact duplicate difference rows (same study, reference and answer) are kept once (``duplicate``);
- diagnostic rows never use the reference (in v1.0.1 it can even be a later study);
- answers are stripped (the dataset's generator leaves a trailing space);
- ``test_policy="one_study_per_subject"`` (the LUMEN paper's test set) keeps, for the test split, the
  questions of one study per subject, drawn with a seeded generator (``other_study_of_subject``).
``sample_id`` is ``diffvqa-<row>``, ``row`` counting data rows of ``mimic_pair_questions.csv`` from 0
(an identifier; messages name the file's line, the header being line 1). A row with an empty
required value, an unknown split or question type, or a study missing from ``mimic_all.csv`` is an
error; ``python -m datamodules.validate`` lists every such row.
"""

from __future__ import annotations

from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pandas as pd

from common.errors import ConfigError
from common.readers import InputError, Problems, Table, read_all, read_csv, raise_or_record
from datamodules.mimic import RESTORE, image_path, parse_study_date, whole_number
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
    fell_back: Counter = field(default_factory=Counter)  # samples loaded under a documented fallback

    def __str__(self) -> str:
        loaded = ", ".join(f"{n} {task}" for task, n in sorted(self.loaded.items())) or "nothing"
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        fell_back = "".join(f"; {n} fell back: {policy}" for policy, n in sorted(self.fell_back.items()))
        return f"loaded {loaded}; skipped {skipped}{fell_back}"


@dataclass(frozen=True)
class Study:
    """A row of ``mimic_all.csv``: the study's subject, its image and its date."""

    subject_id: int
    study_id: int
    dicom_id: str
    study_date: date


def read_studies(diffvqa_dir: str | Path, problems: Problems | None = None) -> dict[int, Study | None]:
    """study_id -> its row of ``mimic_all.csv``; a row with an empty or malformed value, or a
    repeated study, is an error (with ``problems``: recorded and left out, its study mapped to None
    where its id could be read, so that questions about it are not reported as about a missing study)."""
    table = read_csv(Path(diffvqa_dir) / "mimic_all.csv", STUDY_COLUMNS, "Medical-Diff-VQA's mimic_all.csv "
                     "(set paths.diffvqa to the Medical-Diff-VQA directory)", dtype={"dicom_id": str})
    skip = table.missing_values(STUDY_COLUMNS, problems, fix=RESTORE)
    columns = {name: table.frame[name].tolist() for name in STUDY_COLUMNS}
    studies: dict[int, Study | None] = {}
    first_row: dict[int, int] = {}
    for row, dicom_id in enumerate(columns["dicom_id"]):
        parsed = None if row in skip else _parsed(table, row, {name: columns[name][row] for name in STUDY_PARSERS},
                                                  problems)
        if parsed is None:
            with suppress(ValueError):  # a row whose id cannot be read names no study; its problem is reported
                studies.setdefault(whole_number(columns["study_id"][row]), None)
            continue
        study_id = parsed["study_id"]
        if study_id in first_row:
            raise_or_record(problems, table.error(
                row, "study_id", f"study {study_id} repeats line {table.line(first_row[study_id])}",
                fix="each study has one row", kind="repeated study"))
            continue
        first_row[study_id] = row
        studies[study_id] = Study(dicom_id=dicom_id, **parsed)
    return studies


STUDY_PARSERS = {"subject_id": whole_number, "study_id": whole_number, "study_date": parse_study_date}


def _parsed(table: Table, row: int, values: dict, problems: Problems | None) -> dict | None:
    """The row's values parsed by ``STUDY_PARSERS``, or None after reporting the first that fails."""
    parsed = {}
    for column, value in values.items():
        try:
            parsed[column] = STUDY_PARSERS[column](value)
        except ValueError as error:
            raise_or_record(problems, table.error(row, column, str(error), fix=RESTORE, kind=f"malformed {column}"))
            return None
    return parsed


@dataclass
class DiffVQA:
    """Medical-Diff-VQA's two tables, read and checked once: ``usable`` are the question rows
    without a problem, with their study and, for difference questions, their reference study."""

    questions: Table
    studies: dict[int, Study]
    usable: list[tuple[int, Study, Study | None]]


def read_diffvqa(diffvqa_dir: str | Path, problems: Problems | None = None) -> DiffVQA:
    """Both tables of a Medical-Diff-VQA directory. A question row with an empty required value, an
    unknown split or question type, a study that ``mimic_all.csv`` lacks or gives another subject is
    an error (with ``problems``: recorded and left out)."""
    studies, questions = read_all(problems, lambda: read_studies(diffvqa_dir, problems), lambda: read_csv(
        Path(diffvqa_dir) / "mimic_pair_questions.csv", PAIR_COLUMNS,
        "Medical-Diff-VQA's mimic_pair_questions.csv (set paths.diffvqa to the Medical-Diff-VQA directory)"))
    frame = questions.frame
    skip = questions.missing_values([c for c in PAIR_COLUMNS if c != "ref_id"], problems,
                                    fix=RESTORE)
    usable = []
    columns = (frame[name].tolist() for name in ("split", "question_type", "subject_id", "study_id", "ref_id"))
    for row, (split, question_type, subject_id, study_id, ref_id) in enumerate(zip(*columns)):
        if row in skip:
            continue
        problem = None
        if split not in SPLITS:
            problem = ("split", f"unknown value {split!r}", f"expected one of {list(SPLITS)}", "unknown split")
        elif question_type not in QUESTION_TYPES:
            problem = ("question_type", f"unknown value {question_type!r}", f"expected one of {list(QUESTION_TYPES)}",
                       "unknown question_type")
        if problem:
            raise_or_record(problems, questions.error(row, problem[0], problem[1], fix=problem[2], kind=problem[3]))
            continue
        current = _question_study(questions, row, "study_id", study_id, studies, problems)
        if current is None:
            continue
        if not _same_number(subject_id, current.subject_id):
            raise_or_record(problems, questions.error(
                row, "subject_id", f"{subject_id}, but {questions.path.parent / 'mimic_all.csv'} gives study "
                f"{current.study_id} to subject {current.subject_id}", fix="use the tables of the same release",
                kind="subject differs from mimic_all.csv"))
            continue
        reference = None
        if question_type == "difference":
            reference = _question_study(questions, row, "ref_id", ref_id, studies, problems)
            if reference is None:
                continue
        usable.append((row, current, reference))
    return DiffVQA(questions, studies, usable)


def _same_number(value, number: int) -> bool:
    try:
        return whole_number(value) == number
    except ValueError:
        return False


def _question_study(questions: Table, row: int, column: str, value, studies: dict[int, Study],
                    problems: Problems | None) -> Study | None:
    """The study a question row names in ``column``, or None after reporting why there is none."""
    try:
        study_id = whole_number(value)
    except ValueError as error:
        raise_or_record(problems, questions.error(row, column, "empty" if pd.isna(value) else str(error), fix=RESTORE,
                                         kind=f"malformed {column}"))
        return None
    if studies.get(study_id) is None:
        raise_or_record(problems, study_error(questions.path, questions.line(row), column, study_id, studies,
                                              questions.path.parent / "mimic_all.csv"))
        return None
    return studies[study_id]


def study_error(path: Path, line: int | None, column: str, study_id, studies: dict[int, Study | None],
                studies_path: Path) -> InputError:
    """A question names a study that ``studies`` lacks, or whose row was rejected (and reported)."""
    if study_id in studies:
        return InputError(path, f"study {study_id}'s row in {studies_path} has a problem (reported on its own)",
                          line=line, field=column, kind=f"{column} with a rejected mimic_all.csv row")
    return InputError(path, f"study {study_id} is not in {studies_path}", line=line, field=column,
                      fix="use the tables of the same Medical-Diff-VQA release", kind=f"{column} not in mimic_all.csv")


def one_study_per_subject(table: pd.DataFrame, seed: int) -> set[int]:
    """The LUMEN paper's test set: of the studies in ``table`` (columns subject_id, study_id), one
    per subject, drawn with a seeded generator."""
    studies = table[["subject_id", "study_id"]].drop_duplicates().sort_values(["subject_id", "study_id"])
    return set(studies.groupby("subject_id").sample(n=1, random_state=seed)["study_id"])


def load_diffvqa(
    diffvqa_dir: str | Path | DiffVQA,
    mimic_root: str | Path,
    split: str,
    tasks: tuple[str, ...] = ("diagnostic", "difference"),
    use_prior: bool = True,
    test_policy: str = "all",
    seed: int = 0,
    problems: Problems | None = None,
) -> tuple[list[Sample], LoadReport]:
    """Samples of one split, from the directory or from its tables already read (``read_diffvqa``).
    ``use_prior=False`` turns difference questions into single-image ones (the control that shows
    what the current image alone can answer)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown Medical-Diff-VQA split {split!r}: expected one of {SPLITS}")
    if test_policy not in TEST_POLICIES:
        raise ConfigError(f"test_policy={test_policy!r}: expected one of {TEST_POLICIES}")
    data = diffvqa_dir if isinstance(diffvqa_dir, DiffVQA) else read_diffvqa(diffvqa_dir, problems)
    frame = data.questions.frame
    kept_studies = None
    if split == "test" and test_policy == "one_study_per_subject":
        kept_studies = one_study_per_subject(frame[frame["split"] == "test"], seed)
    splits, types, texts, answers = (frame[column].tolist() for column in ("split", "question_type", "question", "answer"))
    report = LoadReport()
    samples: list[Sample] = []
    seen_differences: set[tuple[int, int, str]] = set()
    for row, current, reference in data.usable:
        if splits[row] != split:
            continue
        task = "difference" if types[row] == "difference" else "diagnostic"
        if task not in tasks:
            continue
        if kept_studies is not None and current.study_id not in kept_studies:
            report.skipped["other_study_of_subject"] += 1
            continue
        answer = str(answers[row]).strip()
        prior_image = interval_days = prior_study_id = None
        if task == "difference":
            key = (current.study_id, reference.study_id, answer)
            if key in seen_differences:
                report.skipped["duplicate"] += 1
                continue
            seen_differences.add(key)
            days = (current.study_date - reference.study_date).days
            if days < 0:
                report.skipped["ref_later"] += 1
                continue
            if use_prior:
                prior_study_id = reference.study_id
                prior_image = image_path(mimic_root, reference.subject_id, reference.study_id, reference.dicom_id)
                interval_days = float(days)
        samples.append(
            Sample(
                sample_id=f"diffvqa-{row}",
                task=task,
                question_type=types[row],
                question=str(texts[row]),
                answer=answer,
                image=image_path(mimic_root, current.subject_id, current.study_id, current.dicom_id),
                prior_image=prior_image,
                interval_days=interval_days,
                subject_id=current.subject_id,
                study_id=current.study_id,
                prior_study_id=prior_study_id,
            )
        )
        report.loaded[task] += 1
    return samples, report
