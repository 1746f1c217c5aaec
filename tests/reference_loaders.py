"""The Medical-Diff-VQA and prognostic loaders as they were before they worked column by column
(commit 31fbbfa): row by row, one ``Sample`` per question. Kept as the reference that the column-wise
loaders must equal, sample for sample, in order, with the same load report
(tests/test_loaders_columnwise.py). Not used by lumen itself."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.errors import ConfigError
from common.readers import InputError, Problems, Table, read_all, read_csv, read_jsonl, raise_or_record
from datamodules.diffvqa import (PAIR_COLUMNS, QUESTION_TYPES, SPLITS, STUDY_COLUMNS, LoadReport, Study,
                                 TEST_POLICIES, one_study_per_subject)
from datamodules.mimic import RESTORE, image_path, parse_study_date, whole_number
from datamodules.prognostic import RECORD_KEYS, TYPED_FIELDS
from datamodules.records import Sample


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


def load_prognostic(path: str | Path, diffvqa_dir: str | Path, mimic_root: str | Path, split: str,
                    problems: Problems | None = None,
                    studies: dict[int, Study] | None = None) -> tuple[list[Sample], LoadReport]:
    """Samples of one split of a prognostic JSONL: the current and prior study's images (through
    Diff-VQA's ``mimic_all.csv``, or ``studies`` already read from it) and the interval between them;
    ``sample_id`` is the record's ``id``. A line that is not a record of ``RECORD_KEYS``, names an
    unknown split or study, or whose ``interval_days`` disagrees with the studies' dates is an error
    (with ``problems``: recorded and left out)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown prognostic split {split!r}: expected one of {SPLITS}")
    studies = read_studies(diffvqa_dir, problems) if studies is None else studies
    studies_path = Path(diffvqa_dir) / "mimic_all.csv"
    load_report, samples, first_line = LoadReport(), [], {}
    for line, record in read_jsonl(path, "prognostic questions: build them with `python -m datamodules.build "
                                         "prognostic`"):
        try:
            sample = _sample(path, line, record, split, studies, studies_path, mimic_root, first_line)
        except InputError as error:
            raise_or_record(problems, error)
            continue
        if sample is not None:
            samples.append(sample)
            load_report.loaded["prognostic"] += 1
    return samples, load_report


def _sample(path: Path, line: int, record, split: str, studies: dict[int, Study | None], studies_path: Path,
            mimic_root: str | Path, first_line: dict[str, int]) -> Sample | None:
    """The record's sample when it belongs to ``split``, None when it does not; an ``InputError`` for
    a problem (checked on every line, whatever its split). ``first_line`` maps the ids seen so far to
    their line."""
    def fail(field: str | None, problem: str, kind: str) -> InputError:
        return InputError(path, problem, line=line, field=field, kind=kind,
                          fix="rebuild the file with `python -m datamodules.build prognostic`")

    if isinstance(record, InputError):
        raise record
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise fail(None, f"missing field(s) {missing}", "missing fields")
    for key, (types, what) in TYPED_FIELDS.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types) or value == "":
            raise fail(key, f"{value!r} is not {what}", f"malformed {key}")
    if record["id"] in first_line:
        raise fail("id", f"{record['id']} repeats line {first_line[record['id']]}", "repeated id")
    first_line[record["id"]] = line
    if record["split"] not in SPLITS:
        raise fail("split", f"unknown value {record['split']!r}; expected one of {SPLITS}", "unknown split")
    current, prior = (studies.get(record[key]) for key in ("study_id", "ref_id"))
    for key, study in (("study_id", current), ("ref_id", prior)):
        if study is None:
            raise study_error(path, line, key, record[key], studies, studies_path)
    interval = (current.study_date - prior.study_date).days
    if interval != record["interval_days"]:
        raise fail("interval_days", f"{record['interval_days']} but {studies_path} gives {interval} days between "
                   f"studies {record['ref_id']} and {record['study_id']}", "interval_days")
    if record["split"] != split:
        return None
    return Sample(
        sample_id=record["id"], task="prognostic", question_type="prognostic", question=record["question"],
        answer=record["answer"],
        image=image_path(mimic_root, current.subject_id, current.study_id, current.dicom_id),
        prior_image=image_path(mimic_root, prior.subject_id, prior.study_id, prior.dicom_id),
        interval_days=float(interval), subject_id=current.subject_id, study_id=current.study_id,
        prior_study_id=prior.study_id,
    )
