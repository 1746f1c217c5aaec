"""A person's own studies as ``Sample``s: one current study, optionally its prior, the days between them
and a question (``datamodules.presets``), checked as a radiologist would check them; and the manifest
of many such pairs that ``predict.py manifest=`` answers.

The interval comes from, in this order: ``interval_days`` as given; the dates given
(``current_date``/``prior_date``, each overriding its file's own); the DICOM files' dates
(``StudyDate``, else ``AcquisitionDate``, else ``ContentDate``; ``datamodules.dicom``). Refused: a
prior after the current study, and two DICOMs of different patients (by ``PatientID``) unless
``allow_different_patients``. A lateral view is warned about (the models are trained on frontal
views). No date or identifier of a patient goes into a sample, a warning or an error message: they say
which tag a date came from and how many days apart the studies are, never the dates themselves.

The manifest is a CSV with a header: ``current`` and ``question`` are required; ``prior``,
``days``, ``finding``, ``options`` (choices separated by ``|``), ``current_date``, ``prior_date``,
``interval_days`` and ``id`` may be given (empty cells mean not given). Paths are relative to the
manifest's directory. A row's sample id is its ``id``, else ``line-<its line>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

from common.readers import InputError, Problems, raise_or_record, read_csv
from datamodules.dicom import StudyFile, read_study_file
from datamodules.presets import AskError, resolve_question
from datamodules.records import Sample

MANIFEST_COLUMNS = ("current", "question")
OPTIONAL_COLUMNS = ("id", "prior", "days", "finding", "options", "current_date", "prior_date", "interval_days")
OPTION_SEPARATOR = "|"


@dataclass(frozen=True)
class Interval:
    days: float
    source: str  # where the days came from, for the person to check


@dataclass(frozen=True)
class Pair:
    """What a person asks about: the question's sample, the interval used and what they should know."""

    sample: Sample
    interval: Interval | None
    warnings: tuple[str, ...] = field(default=())


def parse_date(text: str, name: str) -> date:
    """``YYYY-MM-DD`` or DICOM's ``YYYYMMDD``."""
    digits = text.strip().replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise AskError(name, f"{name}={text!r} is not a date: write YYYY-MM-DD") from None


def interval_between(current: StudyFile, prior: StudyFile, current_date: str | None = None,
                     prior_date: str | None = None, interval_days: float | None = None) -> Interval:
    """The days from the prior study to the current one, and where they came from (module docstring)."""
    if interval_days is not None:
        if current_date or prior_date:
            raise AskError("interval_days", "give interval_days or the dates (current_date, prior_date), not both")
        if isinstance(interval_days, bool) or not isinstance(interval_days, (int, float)) \
                or not math.isfinite(interval_days) or interval_days < 0:
            raise AskError("interval_days", f"interval_days={interval_days!r}: expected a number of days, 0 or more")
        return Interval(float(interval_days), "interval_days as given")
    dates, sources = [], []
    for study, given, name in ((current, current_date, "current_date"), (prior, prior_date, "prior_date")):
        if given:
            dates.append(parse_date(given, name))
            sources.append(name)
        elif study.date is not None:
            dates.append(study.date)
            sources.append(study.date_source)
        else:
            kind = "a DICOM without StudyDate, AcquisitionDate or ContentDate" if study.is_dicom else "an image file"
            raise AskError(name, f"no date for the {name.removesuffix('_date')} study ({study.path.name} is {kind}): "
                             f"give {name}=YYYY-MM-DD, or interval_days=<days between the studies>", "no date")
    days = (dates[0] - dates[1]).days
    if days < 0:
        by = f"by {sources[0]}" if sources[0] == sources[1] else f"by its {sources[1]} and the current's {sources[0]}"
        raise AskError("prior", f"the prior study is {-days} days after the current one ({by}): swap current and "
                       "prior", "prior after current")
    source = f"{sources[0]} of both studies" if sources[0] == sources[1] else f"{sources[0]} and {sources[1]}"
    return Interval(float(days), source)


def check_same_patient(current: StudyFile, prior: StudyFile, allow_different_patients: bool) -> None:
    """Two DICOMs whose PatientIDs differ are refused unless allowed (a key of the ID is compared, never
    the ID itself); an image file has no PatientID to compare."""
    if current.patient_key is None or prior.patient_key is None or current.patient_key == prior.patient_key:
        return
    if not allow_different_patients:
        raise AskError("prior", f"{current.path.name} and {prior.path.name} have different PatientIDs: a prior "
                       "study must be the same patient's; set allow_different_patients=true if they are",
                       "different patients")


def study_warnings(studies: dict[str, StudyFile | None]) -> list[str]:
    """A lateral view (the models are trained on frontal ones), and what reading each file found (a
    malformed date that fell back to another tag)."""
    warnings = []
    for role, study in studies.items():
        if study is None:
            continue
        if study.is_lateral:
            warnings.append(f"the {role} study ({study.path.name}) is a lateral view (ViewPosition {study.view}): the "
                            "model was trained on frontal (PA/AP) views, so its answer may not mean much")
        warnings += list(study.warnings)
    return warnings


def make_pair(sample_id: str, current: StudyFile, prior: StudyFile | None, question: str, *, days: int | None = None,
              finding: str | None = None, options: list[str] | None = None, current_date: str | None = None,
              prior_date: str | None = None, interval_days: float | None = None,
              allow_different_patients: bool = False, history: str | None = None) -> Pair:
    """One question about ``current`` (and ``prior``) as a ``Sample`` with no reference answer.
    Anything wrong is an ``AskError`` naming the setting to change."""
    if prior is None and (prior_date or interval_days is not None):
        raise AskError("prior", "prior_date and interval_days describe a prior study: give prior=<its file> too",
                       "no prior")
    asked = resolve_question(question, prior is not None, days=days, finding=finding, options=options)
    interval = None
    if prior is not None:
        check_same_patient(current, prior, allow_different_patients)
        interval = interval_between(current, prior, current_date, prior_date, interval_days)
    sample = Sample(
        sample_id=sample_id, task=asked.task, question_type=asked.question_type, question=asked.text, answer=None,
        image=current.path, prior_image=prior.path if prior is not None else None,
        interval_days=interval.days if interval is not None else None, options=asked.options, history=history,
    )
    return Pair(sample, interval, tuple(study_warnings({"current": current, "prior": prior})))


@dataclass
class Manifest:
    pairs: list[Pair]
    rows: int  # data rows in the file


def _cell(row: dict, name: str) -> str | None:
    value = row.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _whole(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise AskError(name, f"{text!r} is not a whole number of days")
    return int(text)


def _number(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise AskError(name, f"{text!r} is not a number of days") from None


def read_manifest(path: str | Path, problems: Problems | None = None, allow_different_patients: bool = False,
                  studies: dict[Path, StudyFile] | None = None) -> Manifest:
    """The manifest's rows as pairs. A row's problem (a missing or unreadable file, a prior after the
    current study, a bad value) is an ``InputError`` naming the line and the field: raised, or with
    ``problems`` recorded and the row left out. ``studies`` caches files read once (a study asked
    several questions is read once)."""
    table = read_csv(path, list(MANIFEST_COLUMNS), "a manifest CSV of the pairs to ask about: columns "
                     f"{', '.join(MANIFEST_COLUMNS)} and any of {', '.join(OPTIONAL_COLUMNS)}", dtype=str)
    path = table.path
    studies = {} if studies is None else studies
    pairs, ids = [], {}
    for row_index, row in enumerate(table.frame.to_dict("records")):
        line = table.line(row_index)

        def fail(field_name: str, problem: str, kind: str | None = None) -> InputError:
            return InputError(path, problem, line=line, field=field_name, kind=kind or f"field {field_name}")

        try:
            files = {}
            for role in ("current", "prior"):
                name = _cell(row, role)
                if name is None:
                    if role == "current":
                        raise fail(role, "empty: name the current study's file", "missing file")
                    continue
                file = (path.parent / name).resolve()
                if file not in studies:
                    try:
                        # Read whole, so that an unreadable file is this row's problem; the pixels are
                        # read again when the sample is, rather than all of them held at once.
                        studies[file] = replace(read_study_file(file), image=None)
                    except InputError as error:
                        raise fail(role, error.problem + (f"; {error.fix}" if error.fix else ""),
                                   "missing file" if not file.exists() else "unreadable file") from None
                files[role] = studies[file]
            sample_id = _cell(row, "id") or f"line-{line}"
            if sample_id in ids:
                raise fail("id", f"{sample_id} repeats line {ids[sample_id]}", "repeated id")
            options = _cell(row, "options")
            try:
                pair = make_pair(
                    sample_id, files["current"], files.get("prior"), _cell(row, "question") or "",
                    days=_whole(_cell(row, "days"), "days"), finding=_cell(row, "finding"),
                    options=options.split(OPTION_SEPARATOR) if options else None,
                    current_date=_cell(row, "current_date"), prior_date=_cell(row, "prior_date"),
                    interval_days=_number(_cell(row, "interval_days"), "interval_days"), allow_different_patients=allow_different_patients,
                )
            except AskError as error:
                raise fail(error.field, str(error), error.kind) from None
        except InputError as error:
            raise_or_record(problems, error)
            continue
        ids[sample_id] = line
        pairs.append(pair)
    return Manifest(pairs, len(table.frame))

