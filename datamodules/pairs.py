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
``interval_days``, ``prior_report`` (a text file) and ``id`` may be given (empty cells mean not given).
Paths are relative to the manifest's directory. A row's sample id is its ``id``, else ``line-<its line>``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

from common.readers import InputError, Problems, raise_or_record, read_csv, read_text
from datamodules.dicom import StudyFile, read_study_file
from datamodules.presets import LETTERS, AskError, resolve_question
from datamodules.records import Sample

MANIFEST_COLUMNS = ("current", "question")
OPTIONAL_COLUMNS = ("id", "prior", "days", "finding", "options", "current_date", "prior_date", "interval_days",
                    "prior_report")
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
    prior_report: str | None = None  # the prior study's report, shown as the checkpoint's history mode shows it


def parse_date(text: str, name: str) -> date:
    """``YYYY-MM-DD`` or DICOM's ``YYYYMMDD``."""
    digits = text.strip().replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise AskError(name, f"{name} is not a date: write YYYY-MM-DD") from None


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


def check_same_patient(current: StudyFile, prior: StudyFile, allow_different_patients: bool) -> list[str]:
    """Two DICOMs whose PatientIDs differ are refused unless allowed (a key of the ID is compared, never
    the ID itself). A pair that cannot be checked (an image file, a DICOM without PatientID) is warned
    about when one of its files is a DICOM, and so is a prior that is the current study's own file."""
    if current.path.resolve() == prior.path.resolve():
        return [f"current and prior are the same file ({current.path.name}): the model is asked to compare a "
                "study with itself"]
    if current.patient_key is None or prior.patient_key is None:
        if not (current.is_dicom or prior.is_dicom):
            return []
        unchecked = [study.path.name for study in (current, prior) if study.patient_key is None]
        return [f"could not check that both studies are the same patient's: {' and '.join(unchecked)} "
                f"{'has' if len(unchecked) == 1 else 'have'} no PatientID"]
    if current.patient_key != prior.patient_key and not allow_different_patients:
        raise AskError("prior", f"{current.path.name} and {prior.path.name} have different PatientIDs: a prior "
                       "study must be the same patient's; set allow_different_patients=true if they are",
                       "different patients")
    return []


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
              allow_different_patients: bool = False, prior_report: str | None = None) -> Pair:
    """One question about ``current`` (and ``prior``) as a ``Sample`` with no reference answer, as the
    model was trained on its kind: a diagnostic preset without the prior. Anything wrong is an
    ``AskError`` naming the setting to change."""
    if prior is None and (current_date or prior_date or interval_days is not None or prior_report):
        raise AskError("prior", "current_date, prior_date, interval_days and prior_report are about a prior study: "
                       "give prior=<its file> too", "no prior")
    asked = resolve_question(question, prior is not None, days=days, finding=finding, options=options)
    warnings = []
    if asked.one_image and prior is not None:
        warnings.append(f"question={question.strip()} is answered from the current study alone, as the model was "
                        "trained to answer it: the prior study is not shown to it")
        prior = None
    if asked.options is not None and len(asked.options) != len(LETTERS):
        warnings.append(f"{len(asked.options)} options: MMXU's questions, which the model was trained on, have "
                        f"{len(LETTERS)}")
    interval = None
    if prior is not None:
        warnings += check_same_patient(current, prior, allow_different_patients)
        interval = interval_between(current, prior, current_date, prior_date, interval_days)
    sample = Sample(
        sample_id=sample_id, task=asked.task, question_type=asked.question_type, question=asked.text, answer=None,
        image=current.path, prior_image=prior.path if prior is not None else None,
        interval_days=interval.days if interval is not None else None, options=asked.options,
    )
    return Pair(sample, interval, tuple(warnings + study_warnings({"current": current, "prior": prior})),
                prior_report if prior is not None else None)


@dataclass
class Manifest:
    pairs: list[Pair]
    rows: int  # data rows in the file
    lines: dict[str, int]  # each row's sample id to its line
    failed: dict[str, int]  # the sample id of each row left out, to its line
    asked: dict[str, str]  # each pair's sample id to a digest of what its row asks now (``row_digest``)


def row_digest(sample: Sample, files: list[Path | None]) -> str:
    """A digest of what a row asks (its question, interval and choices) and of its files (where they
    are, their size and last change), to tell a row that changed since its answer, or whose files were
    replaced, from one as it was. The digest is stored, not the paths or the question."""
    parts = [sample.question, sample.interval_days, sample.options]
    for file in files:
        stat = file.stat() if file is not None else None
        parts.append(None if file is None else [str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cell(row: dict, name: str) -> str | None:
    value = row.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def parse_days(text: str | None, name: str, whole: bool = False) -> float | int | None:
    """A number of days written in a manifest's cell or a page's box; None when empty."""
    text = text.strip() if text else None
    if not text:
        return None
    if whole:
        if not text.isdigit():
            raise AskError(name, f"{text!r} is not a whole number of days")
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise AskError(name, f"{text!r} is not a number of days") from None


def read_manifest(path: str | Path, problems: Problems | None = None,
                  allow_different_patients: bool = False) -> Manifest:
    """The manifest's rows as pairs. A row's problem (a missing or unreadable file, a prior after the
    current study, a bad value) is an ``InputError`` naming the line and the field: raised, or with
    ``problems`` recorded and the row left out. A column the manifest does not know is refused (a
    misspelt ``id`` would otherwise number the rows by line). A study asked several questions is read once."""
    table = read_csv(path, list(MANIFEST_COLUMNS), "a manifest CSV of the pairs to ask about: columns "
                     f"{', '.join(MANIFEST_COLUMNS)} and any of {', '.join(OPTIONAL_COLUMNS)}", dtype=str)
    path = table.path
    unknown = [str(name) for name in table.frame.columns if name not in MANIFEST_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise InputError(path, f"unknown column{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
                         line=1, fix=f"the columns are {', '.join(MANIFEST_COLUMNS)} and any of "
                         f"{', '.join(OPTIONAL_COLUMNS)}")
    studies: dict[Path, StudyFile] = {}
    pairs, ids, failed, asked = [], {}, {}, {}
    for row_index, row in enumerate(table.frame.to_dict("records")):
        line = table.line(row_index)
        sample_id = _cell(row, "id") or f"line-{line}"

        def fail(field_name: str, problem: str, kind: str | None = None) -> InputError:
            return InputError(path, problem, line=line, field=field_name, kind=kind or f"field {field_name}")

        try:
            if sample_id in ids:
                raise fail("id", f"{sample_id} repeats line {ids[sample_id]}", "repeated id")
            ids[sample_id] = line
            read = {}
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
                        raise fail(role, f"{file}: {error.problem}" + (f"; {error.fix}" if error.fix else ""),
                                   "missing file" if not file.exists() else "unreadable file") from None
                read[role] = studies[file]
            options, report_path, report = _cell(row, "options"), _cell(row, "prior_report"), None
            if report_path is not None:
                report_path = (path.parent / report_path).resolve()
                try:
                    report = read_text(report_path, "the prior study's report as a text file")
                except InputError as error:
                    raise fail("prior_report", f"{report_path}: {error.problem}"
                               + (f"; {error.fix}" if error.fix else "")) from None
            try:
                pair = make_pair(
                    sample_id, read["current"], read.get("prior"), _cell(row, "question") or "",
                    days=parse_days(_cell(row, "days"), "days", whole=True), finding=_cell(row, "finding"),
                    options=options.split(OPTION_SEPARATOR) if options else None,
                    current_date=_cell(row, "current_date"), prior_date=_cell(row, "prior_date"),
                    interval_days=parse_days(_cell(row, "interval_days"), "interval_days"),
                    allow_different_patients=allow_different_patients, prior_report=report,
                )
            except AskError as error:
                raise fail(error.field, str(error), error.kind) from None
        except InputError as error:
            raise_or_record(problems, error)
            failed.setdefault(sample_id, line)
            continue
        pairs.append(pair)
        shown_prior = read["prior"].path if pair.sample.has_prior else None
        asked[sample_id] = row_digest(pair.sample, [read["current"].path, shown_prior,
                                                    report_path if pair.prior_report is not None else None])
    return Manifest(pairs, len(table.frame), ids, failed, asked)
