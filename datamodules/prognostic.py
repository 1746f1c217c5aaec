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

from common.errors import ConfigError
from common.readers import InputError, Problems, read_jsonl, raise_or_record
from datamodules.diffvqa import SPLITS, LoadReport, Study, read_studies, study_error
from datamodules.mimic import image_path
from datamodules.records import Sample

RECORD_KEYS = (
    "id", "source_sample_id", "source_row", "split", "subject_id", "study_id", "ref_id", "interval_days",
    "difference_question", "difference_answer", "template_id", "days", "question", "answer", "backend",
    "model", "prompt_version",
)


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


# Required fields whose value must be of a type: (types, what a person reads in the message).
TYPED_FIELDS = {
    "id": (str, "a non-empty string"), "split": (str, "a string"), "study_id": (int, "a whole number"),
    "ref_id": (int, "a whole number"), "interval_days": ((int, float), "a number"),
    "question": (str, "a non-empty string"), "answer": (str, "a non-empty string"),
}


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
