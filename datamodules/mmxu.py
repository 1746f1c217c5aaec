"""MMXU (github LinjieMu/MMXU) -> Samples: single-choice questions on how a region changed between a
prior and a current MIMIC-CXR-JPG image, with the prior study's report as optional history.

Both documented shapes are read: the public test file (``prior_image_path`` a string, no reports)
and the dev schema (``prior_image_path`` a list, ``prior_report``, ``related_region_name``, boxes,
``explanation``, ``cur_report``, ``cur_region_report``). Policies:
- a list of prior paths means the patient's earlier images; the question compares with "the
  previous image", so the most recent prior (latest study date-time before the current study) is
  used, and a ``prior_report`` list is read at the same position;
- the interval is ``StudyDate(current) - StudyDate(prior)`` in days from the MIMIC metadata (the
  file stem is the dicom_id), as for Medical-Diff-VQA; a prior taken after the current image is
  skipped and counted (``prior_later``);
- ``content_type`` (occasionally inconsistent with the answer) becomes ``question_type``, for
  per-type reporting only: the answer is always the ``answer`` letter;
- history: ``none``; ``global`` (MAG's global record) = the prior report's FINDINGS and IMPRESSION;
  ``regional`` (MAG's regional record) = that report's sentences about the asked region
  (``related_region_name`` where given, else the Chest ImaGenome region named in the question). A
  question that names no region (the real test set asks about tubes, or "the right and left lungs")
  gets the global record instead, counted in the load report (``fell back``); the file is never
  refused for it.
  The report is the row's ``prior_report`` where present, else ``reports_root/files/pXX/pSUBJECT/
  sSTUDY.txt`` of the MIMIC-CXR reports.
``sample_id`` is ``<file stem>-<id>`` (``MMXU-test-17``), so the test and dev files never collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.errors import ConfigError
from common.readers import InputError, Problems, read_jsonl, read_text, raise_or_record
from datamodules.diffvqa import LoadReport
from datamodules.mimic import load_images
from datamodules.records import Sample

HISTORY_MODES = ("none", "global", "regional")
CONTENT_TYPES = ("worsen", "improved", "no change")
LETTERS = ("A", "B", "C", "D")
REQUIRED_KEYS = ("id", "content_type", "question", "options", "answer", "cur_image_path", "prior_image_path")

# The 29 anatomical regions of Chest ImaGenome, the names MMXU's regions and boxes use.
REGIONS = (
    "right lung", "right upper lung zone", "right mid lung zone", "right lower lung zone", "right hilar structures",
    "right apical zone", "right costophrenic angle", "right hemidiaphragm",
    "left lung", "left upper lung zone", "left mid lung zone", "left lower lung zone", "left hilar structures",
    "left apical zone", "left costophrenic angle", "left hemidiaphragm",
    "trachea", "spine", "right clavicle", "left clavicle", "aortic arch", "mediastinum", "upper mediastinum",
    "svc", "cardiac silhouette", "cavoatrial junction", "right atrium", "carina", "abdomen",
)

# Words by which a report sentence refers to a region (side words aside). A lateral region takes a
# sentence naming its side, or no side at all (a negative like "No pleural effusion." also speaks
# about the left costophrenic angle), that contains one of these; a whole lung takes any such
# sentence about lungs. Report wording is free text, so this is a keyword approximation of Chest
# ImaGenome's sentence-to-region annotations, which are not public with MMXU.
_LUNG_WORDS = ("lung", "pulmonary", "effusion", "pneumothorax", "opacit", "consolidation", "atelectasis",
               "pleural", "base", "apex", "apical", "lobe", "zone")
_REGION_WORDS = {
    "lung": _LUNG_WORDS,
    "upper lung zone": ("upper",),
    "mid lung zone": ("mid lung", "middle", "perihilar"),
    "lower lung zone": ("lower", "base", "basilar", "basal"),
    "hilar structures": ("hilar", "hilum", "hila"),
    "apical zone": ("apical", "apex", "apices", "pneumothorax"),
    "costophrenic angle": ("costophrenic", "effusion", "pleural fluid"),
    "hemidiaphragm": ("diaphragm",),
    "clavicle": ("clavicle",),
    "trachea": ("trachea", "endotracheal"),
    "spine": ("spine", "vertebra", "spinal"),
    "aortic arch": ("aort",),
    "mediastinum": ("mediastin",),
    "upper mediastinum": ("mediastin",),
    "svc": ("svc", "superior vena cava"),
    "cardiac silhouette": ("heart", "cardiac", "cardio"),
    "cavoatrial junction": ("cavoatrial",),
    "right atrium": ("atrium", "atrial"),
    "carina": ("carina",),
    "abdomen": ("abdom", "bowel", "subdiaphragmatic"),
}
_SIDES = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SECTION = re.compile(r"^\s*(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE | re.MULTILINE)
_ANY_SECTION = re.compile(r"^\s*[A-Z][A-Z /]+:", re.MULTILINE)


def report_findings(report: str) -> str:
    """The FINDINGS and IMPRESSION sections of a MIMIC-CXR report as one paragraph, in that order;
    the whole text when it has neither header (some real reports have none)."""
    starts = list(_SECTION.finditer(report))
    if not starts:
        return " ".join(report.split())
    parts = []
    for match in starts:
        following = _ANY_SECTION.search(report, match.end())
        body = report[match.end(): following.start() if following else len(report)]
        parts.append(" ".join(body.split()))
    return " ".join(part for part in parts if part)


def region_sentences(report: str, region: str) -> list[str]:
    """The sentences of a report's FINDINGS/IMPRESSION about one Chest ImaGenome region."""
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}: expected one of the 29 Chest ImaGenome names {REGIONS}")
    side, _, part = region.partition(" ")
    if side not in ("left", "right") or region == "right atrium":  # the atrium is a midline structure
        side, part = None, region
    cues = _REGION_WORDS[part]
    chosen = []
    for sentence in _SENTENCE_END.split(report_findings(report)):
        lowered = sentence.lower()
        sides = set(_SIDES.findall(lowered))
        if side and sides and not sides & {side, "bilateral", "bilaterally", "both"}:
            continue
        if any(cue in lowered for cue in cues):
            chosen.append(sentence)
    return chosen


def _named_region(question: str) -> str | None:
    """The longest Chest ImaGenome region name in the question ("left upper lung zone", not "left lung")."""
    lowered = question.lower()
    for region in sorted(REGIONS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(region)}\b", lowered):
            return region
    return None


def history_text(report: str, mode: str, region: str | None = None) -> str | None:
    """The history lines the prompt carries about the prior study, in MAG's two record forms."""
    if mode == "none":
        return None
    if mode == "global":
        return f"Report of the previous image: {report_findings(report)}"
    sentences = region_sentences(report, region)
    if not sentences:
        return f"The report of the previous image says nothing about the {region}."
    return f"What the report of the previous image says about the {region}: {' '.join(sentences)}"


def history_for_question(report: str, mode: str, question: str) -> str | None:
    """The history lines for a question asked outside the dataset (``predict.py``'s ``prior_report``):
    ``regional`` takes the region the question names, and falls back to ``global`` as the loader does
    for a question that names none."""
    region = _named_region(question) if mode == "regional" else None
    return history_text(report, "global" if mode == "regional" and region is None else mode, region)


def _report_path(reports_root: Path, subject_id: int, study_id: int) -> Path:
    subject = str(subject_id)
    return reports_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}.txt"


def _check_row(row: dict, fail) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise fail(missing[0], f"missing (every MMXU row needs {list(REQUIRED_KEYS)})")
    if isinstance(row["id"], bool) or not isinstance(row["id"], (int, str)) or row["id"] == "":
        raise fail("id", f"{row['id']!r} is not a number or a non-empty string")
    for key in ("question", "cur_image_path"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise fail(key, f"{row[key]!r} is not a non-empty string")
    options = row["options"]
    if not isinstance(options, dict) or sorted(options) != list(LETTERS):
        found = sorted(options) if isinstance(options, dict) else type(options).__name__
        raise fail("options", f"expected an object with exactly the keys A, B, C, D, found {found}")
    if not all(isinstance(text, str) and text.strip() for text in options.values()):
        raise fail("options", "every option needs a non-empty text")
    if not isinstance(row["answer"], str) or row["answer"] not in options:
        raise fail("answer", f"{row['answer']!r} is not a letter of the options {list(LETTERS)}")
    if row["content_type"] not in CONTENT_TYPES:
        raise fail("content_type", f"unknown value {row['content_type']!r} (expected one of {CONTENT_TYPES})")
    priors = row["prior_image_path"]
    if not (isinstance(priors, str) or (isinstance(priors, list) and priors
                                        and all(isinstance(prior, str) for prior in priors))):
        raise fail("prior_image_path", "expected a path or a non-empty list of paths")
    reports = row.get("prior_report")
    if reports is not None and not (isinstance(reports, str) or (
            isinstance(reports, list) and all(isinstance(report, str) for report in reports))):
        raise fail("prior_report", "expected a report or a list of reports (strings)")


def _prior_report(row: dict, chosen: int, prior, reports_root: Path | None, history: str, fail) -> str:
    """The chosen prior's report: the row's ``prior_report`` (one per prior image when a list), else
    the MIMIC-CXR reports tree."""
    prior_report = row.get("prior_report")
    if isinstance(prior_report, list):
        if len(prior_report) != len(row["prior_image_path"]):
            raise fail("prior_report", f"a list of {len(prior_report)} reports for {len(row['prior_image_path'])} "
                                       "prior images: expected one report per prior image")
        prior_report = prior_report[chosen]
    if prior_report is not None:
        if not prior_report.strip():
            raise fail("prior_report", "empty: the prior study's report has no text")
        return prior_report
    if reports_root is None:
        raise fail("prior_report", f"absent, and no reports_root was given: pass the MIMIC-CXR reports "
                                   f"directory for history={history!r}")
    report_file = _report_path(reports_root, int(prior.subject_id), int(prior.study_id))
    if not report_file.is_file():
        raise fail("prior_image_path", f"the prior study's report {report_file} does not exist: is reports_root "
                                       "the MIMIC-CXR reports directory (the one holding files/)?")
    text = read_text(report_file, "the prior study's MIMIC-CXR report")
    if not text.strip():
        raise InputError(report_file, "the file is empty: expected the prior study's MIMIC-CXR report")
    return text


def load_mmxu(
    path: str | Path,
    mimic_root: str | Path,
    history: str = "none",
    reports_root: str | Path | None = None,
    problems: Problems | None = None,
    images: pd.DataFrame | None = None,
) -> tuple[list[Sample], LoadReport]:
    """Samples (task ``mmxu``) of one MMXU JSONL file, with image paths resolved against
    ``mimic_root`` and the interval from its metadata (``images``: ``mimic.load_images``' table, when
    already read). ``reports_root`` (the MIMIC-CXR reports directory holding ``files/``) is needed
    only for history from rows without ``prior_report``. A malformed line is an error (with
    ``problems``: recorded and left out); a file without questions is always one."""
    if history not in HISTORY_MODES:
        raise ConfigError(f"history={history!r}: expected one of {HISTORY_MODES}")
    path, mimic_root = Path(path), Path(mimic_root)
    reports_root = Path(reports_root) if reports_root is not None else None
    lines = read_jsonl(path, "an MMXU JSONL file (e.g. MMXU-test.jsonl)")
    images = load_images(mimic_root) if images is None else images
    metadata = _Metadata(dict(zip(images["dicom_id"].tolist(), images.itertuples(index=False))),
                         images.attrs.get("rejected", set()), mimic_root)
    load_report, first_line = LoadReport(), {}
    samples: list[Sample] = []
    for number, row in lines:
        try:
            _check_line(path, number, row, first_line)
            sample = _sample(path, number, row, metadata, history, reports_root, load_report)
        except InputError as error:
            raise_or_record(problems, error)
            continue
        if sample is not None:
            samples.append(sample)
            load_report.loaded["mmxu"] += 1
    return samples, load_report


def check_mmxu_lines(path: str | Path, problems: Problems) -> int:
    """The checks of ``load_mmxu`` that need no MIMIC metadata (each line's JSON, keys, values and
    id), for ``validate`` when the metadata cannot be read; returns how many lines passed."""
    passed, first_line = 0, {}
    for number, row in read_jsonl(path, "an MMXU JSONL file (e.g. MMXU-test.jsonl)"):
        try:
            _check_line(Path(path), number, row, first_line)
        except InputError as error:
            problems.add(error)
            continue
        passed += 1
    return passed


def _check_line(path: Path, number: int, row: dict | InputError, first_line: dict) -> None:
    """A line is a row of the MMXU schema whose id no earlier line has (``first_line``: id -> line)."""
    if isinstance(row, InputError):
        raise row
    _check_row(row, lambda field, problem: InputError(path, problem, line=number, field=field))
    if row["id"] in first_line:
        raise InputError(path, f"{row['id']!r} repeats line {first_line[row['id']]}", line=number, field="id",
                         kind="repeated id", fix="each question needs its own id (it makes the sample_id)")
    first_line[row["id"]] = number


@dataclass(frozen=True)
class _Metadata:
    """The MIMIC images by dicom_id, the dicom_ids whose metadata row was rejected, and the root."""

    images: dict
    rejected: set
    root: Path


def _sample(path: Path, number: int, row: dict, metadata: _Metadata, history: str, reports_root: Path | None,
            load_report: LoadReport) -> Sample | None:
    """The line's sample, or None when its prior is later than its current image (counted in
    ``load_report``, as are regional histories that fall back to the global one)."""
    def fail(field: str, problem: str) -> InputError:
        return InputError(path, problem, line=number, field=field)

    def image(relative: str, field: str):
        dicom_id = Path(relative).stem
        if dicom_id in metadata.rejected:
            raise InputError(path, f"the metadata row of {relative!r} has a problem (reported on its own)",
                             line=number, field=field, kind="image with a rejected metadata row")
        if dicom_id not in metadata.images:
            raise InputError(path, f"{relative!r} is not in {metadata.root}/mimic-cxr-2.0.0-metadata.csv[.gz]",
                             line=number, field=field, kind="image not in the MIMIC metadata",
                             fix="is mimic_root the MIMIC-CXR-JPG root this file refers to?")
        return metadata.images[dicom_id]

    current = image(row["cur_image_path"], "cur_image_path")
    priors = row["prior_image_path"]
    prior_rows = [image(relative, "prior_image_path") for relative in ([priors] if isinstance(priors, str) else priors)]
    chosen = max(range(len(prior_rows)), key=lambda index: prior_rows[index].study_datetime)
    prior = prior_rows[chosen]
    if prior.study_datetime > current.study_datetime:
        load_report.skipped["prior_later"] += 1
        return None
    history_lines = None
    if history != "none":
        mode, region = history, None
        if history == "regional":
            region = _region(row, fail)
            if region is None:
                mode = "global"
                load_report.fell_back["regional history to global (the question names no region)"] += 1
        history_lines = history_text(_prior_report(row, chosen, prior, reports_root, history, fail), mode, region)
    return Sample(
        sample_id=f"{path.stem}-{row['id']}",
        task="mmxu",
        question_type=row["content_type"],
        question=row["question"],
        answer=row["answer"],
        image=Path(current.path),
        prior_image=Path(prior.path),
        interval_days=float((current.study_datetime.date() - prior.study_datetime.date()).days),
        subject_id=int(current.subject_id),
        study_id=int(current.study_id),
        prior_study_id=int(prior.study_id),
        options={letter: row["options"][letter] for letter in LETTERS},
        history=history_lines,
    )


def _region(row: dict, fail) -> str | None:
    """The Chest ImaGenome region a question asks about: ``related_region_name`` where the row has
    one (it must be one of the 29 names), else the longest name in the question; None when the
    question names none (some real ones ask about a tube or "the right and left lungs")."""
    named = row.get("related_region_name")
    if named:
        if named not in REGIONS:
            raise fail("related_region_name", f"unknown region {named!r}: expected one of the 29 Chest ImaGenome "
                                              f"names {REGIONS}")
        return named
    return _named_region(row["question"])
