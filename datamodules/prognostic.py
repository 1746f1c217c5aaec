"""Prognostic instructions (LUMEN): the loader of the JSONL that ``datamodules.prognostic_builder``
(``python -m datamodules.build prognostic``) and the synthetic world write. One JSON object per question:

    {"id": "prognostic-<row>", "source_sample_id": "diffvqa-<row>", "source_row": <row>,
     "split", "subject_id", "study_id", "ref_id", "interval_days",
     "difference_question", "difference_answer", "template_id", "days", "question", "answer",
     "backend": "rules" | "llm" | "synthetic-truth", "model": <LLM or null>, "prompt_version"}

``row`` counts data rows of ``mimic_pair_questions.csv`` from 0, as the Diff-VQA adapter does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ConfigError
from common.readers import InputError, Problems, read_jsonl, raise_or_record
from datamodules.diffvqa import SPLITS, LoadReport, Studies, read_studies, study_error
from datamodules.mimic import image_paths
from datamodules.table import SampleTable

RECORD_KEYS = (
    "id", "source_sample_id", "source_row", "split", "subject_id", "study_id", "ref_id", "interval_days",
    "difference_question", "difference_answer", "template_id", "days", "question", "answer", "backend",
    "model", "prompt_version",
)


def load_prognostic(path: str | Path, diffvqa_dir: str | Path, mimic_root: str | Path, split: str,
                    problems: Problems | None = None, studies: Studies | None = None,
                    records: pd.DataFrame | None = None) -> tuple[SampleTable, LoadReport]:
    """Samples of one split of a prognostic JSONL: the current and prior study's images (through
    Diff-VQA's ``mimic_all.csv``, or ``studies`` already read from it) and the interval between them;
    ``sample_id`` is the record's ``id``. ``records``: the file already read (``read_prognostic``)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown prognostic split {split!r}: expected one of {SPLITS}")
    studies = read_studies(diffvqa_dir, problems) if studies is None else studies
    records = read_prognostic(path, studies, problems) if records is None else records
    chosen = records[records["split"] == split]
    current, prior = studies.frame.loc[chosen["study_id"].to_numpy()], studies.frame.loc[chosen["ref_id"].to_numpy()]
    load_report = LoadReport()
    if len(chosen):
        load_report.loaded["prognostic"] += len(chosen)
    table = SampleTable.from_columns(
        len(chosen), sample_id=chosen["id"], task=["prognostic"] * len(chosen),
        question_type=["prognostic"] * len(chosen), question=chosen["question"], answer=chosen["answer"],
        image=image_paths(mimic_root, current["subject_id"], current.index, current["dicom_id"]),
        prior_image=image_paths(mimic_root, prior["subject_id"], prior.index, prior["dicom_id"]),
        interval_days=chosen["interval_days"].to_numpy(dtype=np.float64),
        subject_id=current["subject_id"].to_numpy(), study_id=current.index.to_numpy(), prior_study_id=prior.index.to_numpy(),
    )
    return table, load_report


COLUMNS = ["id", "split", "study_id", "ref_id", "interval_days", "question", "answer"]


def read_prognostic(path: str | Path, studies: Studies, problems: Problems | None = None) -> pd.DataFrame:
    """Every record of a prognostic JSONL, checked, in file order: columns ``COLUMNS``. A line that
    is not a record of ``RECORD_KEYS``, names an unknown split or study, or whose ``interval_days``
    disagrees with the studies' dates is an error (with ``problems``: recorded and left out). The
    studies and intervals of a file whose every line is a well-formed record are checked column by
    column; any other file is checked line by line, each problem reported as the lines come."""
    lines = list(read_jsonl(path, "prognostic questions: build them with `python -m datamodules.build prognostic`"))
    frame = _clean_records(lines, studies)
    if frame is not None:
        return frame
    first_line: dict[str, int] = {}
    rows = []
    for line, record in lines:
        try:
            rows.append(_checked(Path(path), line, record, studies, studies.path, first_line))
        except InputError as error:
            raise_or_record(problems, error)
    return _records(rows)


def _records(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).astype({"study_id": np.int64, "ref_id": np.int64,
                                                       "interval_days": np.float64})


def _well_formed(record) -> bool:
    """What ``_checked`` asks of a record before looking up its studies (JSON gives exact types: a
    bool's type is not int)."""
    if isinstance(record, InputError) or not KEYS <= record.keys():
        return False
    for key, types in EXACT_TYPES:
        value = record[key]
        if type(value) not in types or value == "":
            return False
    return record["split"] in SPLITS


def _clean_records(lines: list[tuple[int, dict | InputError]], studies: Studies) -> pd.DataFrame | None:
    """The records when every line passes the checks of ``_checked``, else None."""
    if not all(_well_formed(record) for _, record in lines):
        return None
    try:
        frame = _records([(r["id"], r["split"], r["study_id"], r["ref_id"], r["interval_days"], r["question"],
                           r["answer"]) for _, r in lines])
    except OverflowError:  # an id beyond int64 names no study: said line by line
        return None
    known = studies.frame.index
    if frame["id"].duplicated().any() or not (frame["study_id"].isin(known).all() and frame["ref_id"].isin(known).all()):
        return None
    days = studies.frame["day"]
    intervals = days.reindex(frame["study_id"]).to_numpy() - days.reindex(frame["ref_id"]).to_numpy()
    if not (intervals == frame["interval_days"].to_numpy()).all():
        return None
    frame["interval_days"] = intervals.astype(np.float64)
    return frame


# Required fields whose value must be of a type: (types, what a person reads in the message).
TYPED_FIELDS = {
    "id": (str, "a non-empty string"), "split": (str, "a string"), "study_id": (int, "a whole number"),
    "ref_id": (int, "a whole number"), "interval_days": ((int, float), "a number"),
    "question": (str, "a non-empty string"), "answer": (str, "a non-empty string"),
}


KEYS = frozenset(RECORD_KEYS)
EXACT_TYPES = tuple((key, types if isinstance(types, tuple) else (types,)) for key, (types, _) in TYPED_FIELDS.items())


def _checked(path: Path, line: int, record, studies: Studies, studies_path: Path,
             first_line: dict[str, int]) -> tuple:
    """The record's values (``read_prognostic``'s columns), or an ``InputError`` for its problem.
    ``first_line`` maps the ids seen so far to their line."""
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
    return (record["id"], record["split"], record["study_id"], record["ref_id"], float(interval), record["question"],
            record["answer"])
