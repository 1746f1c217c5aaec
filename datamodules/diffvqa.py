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
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.errors import ConfigError
from common.readers import InputError, Problems, Table, read_all, read_csv, raise_or_record
from datamodules.mimic import RESTORE, image_paths, parse_study_date, whole_number
from datamodules.table import SampleTable, one_array

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

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"loaded": dict(self.loaded), "skipped": dict(self.skipped), "fell_back": dict(self.fell_back)}

    @classmethod
    def from_dict(cls, counts: dict[str, dict[str, int]]) -> LoadReport:
        return cls(**{name: Counter(counts[name]) for name in ("loaded", "skipped", "fell_back")})


@dataclass(frozen=True)
class Study:
    """A row of ``mimic_all.csv``: the study's subject, its image and its date."""

    subject_id: int
    study_id: int
    dicom_id: str
    study_date: date


EPOCH = date(1970, 1, 1)
WHITESPACE = "".join(chr(code) for code in range(0x110000) if chr(code).isspace())  # what str.strip() strips


class Studies:
    """``mimic_all.csv`` read and checked: ``frame`` holds the usable rows (index ``study_id``;
    ``subject_id``, ``dicom_id``, ``day``: the StudyDate as days since 1970-01-01); ``rejected`` the
    studies whose row had a problem (reported), so that a question about one is not reported again
    as about a missing study. Read like a dict study_id -> ``Study`` (None for a rejected one)."""

    def __init__(self, path: Path, frame: pd.DataFrame, rejected: set[int]):
        self.path, self.frame, self.rejected = path, frame, rejected

    @classmethod
    def from_studies(cls, path: Path, studies: dict[int, Study | None]) -> Studies:
        usable = [study for study in studies.values() if study is not None]
        frame = pd.DataFrame({
            "subject_id": np.array([study.subject_id for study in usable], dtype=np.int64),
            "dicom_id": np.array([study.dicom_id for study in usable], dtype=object),
            "day": np.array([(study.study_date - EPOCH).days for study in usable], dtype=np.int64),
        }, index=pd.Index(np.array([study.study_id for study in usable], dtype=np.int64), name="study_id"))
        return cls(path, frame, {study_id for study_id, study in studies.items() if study is None})

    @cached_property
    def _by_id(self) -> dict[int, Study]:
        frame = self.frame
        return {study_id: Study(subject_id, study_id, dicom_id, EPOCH + timedelta(days=day)) for study_id, subject_id,
                dicom_id, day in zip(frame.index.tolist(), frame["subject_id"].tolist(), frame["dicom_id"].tolist(),
                                     frame["day"].tolist())}

    def get(self, study_id) -> Study | None:
        return self._by_id.get(study_id)

    def __getitem__(self, study_id) -> Study | None:
        if study_id in self.rejected:
            return None
        return self._by_id[study_id]

    def __contains__(self, study_id) -> bool:
        return study_id in self._by_id or study_id in self.rejected

    def __len__(self) -> int:
        return len(self.frame) + len(self.rejected)


def read_studies(diffvqa_dir: str | Path, problems: Problems | None = None) -> Studies:
    """``mimic_all.csv``; a row with an empty or malformed value, or a repeated study, is an error
    (with ``problems``: recorded and left out, its study among the ``rejected`` where its id could be
    read). A table without such a row is read column by column; one with any is read row by row,
    so that every problem is reported as the rows come."""
    table = read_csv(Path(diffvqa_dir) / "mimic_all.csv", STUDY_COLUMNS, "Medical-Diff-VQA's mimic_all.csv "
                     "(set paths.diffvqa to the Medical-Diff-VQA directory)", dtype={"dicom_id": str})
    studies = _clean_studies(table)
    return studies if studies is not None else Studies.from_studies(table.path, _checked_studies(table, problems))


def _whole_numbers(values: pd.Series) -> pd.Series:
    """The values as int64 where each is a whole number; None when any is not."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any() or (numbers % 1 != 0).any():
        return None
    return numbers.astype(np.int64)


def _study_days(values: pd.Series) -> pd.Series | None:
    """StudyDates (YYYYMMDD) as days since 1970-01-01; None when any is not a date."""
    text = values.astype(str).str.strip().str.removesuffix(".0")
    if not text.str.fullmatch(r"\d{8}").all():
        return None
    moments = pd.to_datetime(text, format="%Y%m%d", errors="coerce")
    if moments.isna().any():
        return None
    return (moments - pd.Timestamp(EPOCH)).dt.days.astype(np.int64)


def _clean_studies(table: Table) -> Studies | None:
    """The table read column by column, or None when a row has a problem (then read row by row)."""
    frame = table.frame
    if frame[STUDY_COLUMNS].isna().any().any():
        return None
    subject_ids, study_ids, days = (_whole_numbers(frame["subject_id"]), _whole_numbers(frame["study_id"]),
                                    _study_days(frame["study_date"]))
    if subject_ids is None or study_ids is None or days is None or study_ids.duplicated().any():
        return None
    return Studies(table.path, pd.DataFrame({
        "subject_id": subject_ids.to_numpy(), "dicom_id": frame["dicom_id"].to_numpy(dtype=object),
        "day": days.to_numpy()}, index=pd.Index(study_ids.to_numpy(), name="study_id")), set())


def _checked_studies(table: Table, problems: Problems | None) -> dict[int, Study | None]:
    """study_id -> its row, row by row: each problem reported as ``read_studies`` says."""
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
    without a problem (``row``, the data row of ``questions``; ``study_id``; ``ref_id``, the reference
    study of a difference question, -1 for a diagnostic one), in file order."""

    questions: Table
    studies: Studies
    usable: pd.DataFrame

    @cached_property
    def text(self) -> dict[str, pa.Array]:
        """The question table's text columns as Arrow strings; answers stripped as ``str.strip`` strips."""
        frame = self.questions.frame
        text = {name: one_array(pa.array(frame[name].astype(str), pa.string()))
                for name in ("split", "question_type", "question", "answer")}
        text["answer"] = pc.utf8_trim(text["answer"], characters=WHITESPACE)
        return text


def read_diffvqa(diffvqa_dir: str | Path, problems: Problems | None = None) -> DiffVQA:
    """Both tables of a Medical-Diff-VQA directory. A question row with an empty required value, an
    unknown split or question type, a study that ``mimic_all.csv`` lacks or gives another subject is
    an error (with ``problems``: recorded and left out). Tables without such a row are checked column
    by column; otherwise row by row, each problem reported as the rows come."""
    studies, questions = read_all(problems, lambda: read_studies(diffvqa_dir, problems), lambda: read_csv(
        Path(diffvqa_dir) / "mimic_pair_questions.csv", PAIR_COLUMNS,
        "Medical-Diff-VQA's mimic_pair_questions.csv (set paths.diffvqa to the Medical-Diff-VQA directory)"))
    usable = _clean_questions(questions, studies)
    if usable is None:
        usable = _checked_questions(questions, studies, problems)
    return DiffVQA(questions, studies, usable)


def _usable(rows, study_ids, ref_ids) -> pd.DataFrame:
    return pd.DataFrame({"row": np.asarray(rows, dtype=np.int64), "study_id": np.asarray(study_ids, dtype=np.int64),
                         "ref_id": np.asarray(ref_ids, dtype=np.int64)})


def _clean_questions(questions: Table, studies: Studies) -> pd.DataFrame | None:
    """Every row usable, checked column by column; None when a row has a problem."""
    frame = questions.frame
    if frame[[c for c in PAIR_COLUMNS if c != "ref_id"]].isna().any().any():
        return None
    if not (frame["split"].isin(SPLITS).all() and frame["question_type"].isin(QUESTION_TYPES).all()):
        return None
    study_ids, subject_ids = _whole_numbers(frame["study_id"]), _whole_numbers(frame["subject_id"])
    if study_ids is None or subject_ids is None or not study_ids.isin(studies.frame.index).all():
        return None
    if not (studies.frame["subject_id"].reindex(study_ids).to_numpy() == subject_ids.to_numpy()).all():
        return None
    difference = (frame["question_type"] == "difference").to_numpy()
    ref_ids = np.full(len(frame), -1, dtype=np.int64)
    if difference.any():
        refs = _whole_numbers(frame["ref_id"][difference])
        if refs is None or not refs.isin(studies.frame.index).all():
            return None
        ref_ids[difference] = refs.to_numpy()
    return _usable(np.arange(len(frame)), study_ids.to_numpy(), ref_ids)


def _checked_questions(questions: Table, studies: Studies, problems: Problems | None) -> pd.DataFrame:
    """The usable rows, checked row by row: each problem reported as ``read_diffvqa`` says."""
    frame = questions.frame
    skip = questions.missing_values([c for c in PAIR_COLUMNS if c != "ref_id"], problems,
                                    fix=RESTORE)
    rows, study_ids, ref_ids = [], [], []
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
        rows.append(row)
        study_ids.append(current.study_id)
        ref_ids.append(-1 if reference is None else reference.study_id)
    return _usable(rows, study_ids, ref_ids)


def _same_number(value, number: int) -> bool:
    try:
        return whole_number(value) == number
    except ValueError:
        return False


def _question_study(questions: Table, row: int, column: str, value, studies: Studies,
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


def study_error(path: Path, line: int | None, column: str, study_id, studies: Studies,
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
) -> tuple[SampleTable, LoadReport]:
    """Samples of one split, from the directory or from its tables already read (``read_diffvqa``).
    ``use_prior=False`` turns difference questions into single-image ones (the control that shows
    what the current image alone can answer). Built column by column: nothing per question but its
    values."""
    if split not in SPLITS:
        raise ConfigError(f"unknown Medical-Diff-VQA split {split!r}: expected one of {SPLITS}")
    if test_policy not in TEST_POLICIES:
        raise ConfigError(f"test_policy={test_policy!r}: expected one of {TEST_POLICIES}")
    data = diffvqa_dir if isinstance(diffvqa_dir, DiffVQA) else read_diffvqa(diffvqa_dir, problems)
    frame, usable, studies, text = data.questions.frame, data.usable, data.studies.frame, data.text
    rows = usable["row"].to_numpy()
    difference = _is(text["question_type"], "difference")[rows]
    wanted = _is(text["split"], split)[rows]
    if "difference" not in tasks:
        wanted &= ~difference
    if "diagnostic" not in tasks:
        wanted &= difference
    report = LoadReport()
    if split == "test" and test_policy == "one_study_per_subject":
        kept_studies = one_study_per_subject(frame[frame["split"] == "test"], seed)
        other = wanted & ~np.isin(usable["study_id"].to_numpy(), np.fromiter(kept_studies, np.int64, len(kept_studies)))
        _count(report.skipped, "other_study_of_subject", other)
        wanted &= ~other
    picked = usable[wanted]
    rows, difference = picked["row"].to_numpy(), difference[wanted]
    answers = text["answer"].take(rows)
    # A difference row repeating an earlier one's study, reference and answer is kept once; a kept
    # one whose reference is later than its study is skipped.
    answer_codes = answers.dictionary_encode().indices.to_numpy(zero_copy_only=False)
    repeated = difference & pd.DataFrame({"study": picked["study_id"].to_numpy(), "ref": picked["ref_id"].to_numpy(),
                                          "answer": answer_codes, "difference": difference}).duplicated().to_numpy()
    _count(report.skipped, "duplicate", repeated)
    current = studies.loc[picked["study_id"].to_numpy()]
    days = np.zeros(len(picked), dtype=np.int64)
    reference = studies.reindex(np.where(difference, picked["ref_id"].to_numpy(), current.index.to_numpy()))
    days[difference] = current["day"].to_numpy()[difference] - reference["day"].to_numpy()[difference]
    ref_later = difference & ~repeated & (days < 0)
    _count(report.skipped, "ref_later", ref_later)
    keep = ~(repeated | ref_later)
    rows, difference, days, answers = rows[keep], difference[keep], days[keep], answers.filter(keep)
    current, reference = current[keep], reference[keep]
    two_images = difference & use_prior
    subject_ids, study_ids = current["subject_id"].to_numpy(), current.index.to_numpy()
    tasks_of = np.where(difference, "difference", "diagnostic")
    for task in ("diagnostic", "difference"):
        _count(report.loaded, task, tasks_of == task)
    prior_images = image_paths(mimic_root, reference["subject_id"], reference.index, reference["dicom_id"])
    table = SampleTable.from_columns(
        len(rows),
        sample_id=pc.binary_join_element_wise("diffvqa-", pa.array(rows).cast(pa.string()), ""),
        task=pa.array(tasks_of, pa.string()),
        question_type=text["question_type"].take(rows),
        question=text["question"].take(rows),
        answer=answers,
        image=image_paths(mimic_root, subject_ids, study_ids, current["dicom_id"]),
        prior_image=pc.if_else(pa.array(two_images), prior_images, pa.scalar(None, pa.string())),
        interval_days=pa.array(days.astype(np.float64), pa.float64(), mask=~two_images),
        subject_id=subject_ids,
        study_id=study_ids,
        prior_study_id=pa.array(reference.index.to_numpy(), pa.int64(), mask=~two_images),
    )
    return table, report


def _is(values: pa.Array, value: str) -> np.ndarray:
    """Where ``values`` is ``value``, as booleans (an empty cell, null under pandas 3, is not)."""
    return pc.fill_null(pc.equal(values, value), False).to_numpy(zero_copy_only=False)


def _count(counter: Counter, key: str, mask: np.ndarray) -> None:
    """Adds the mask's true values under ``key`` (a key counted zero times stays out, as ``+= 1`` would leave it)."""
    number = int(np.count_nonzero(mask))
    if number:
        counter[key] += number
