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
from common.readers import InputError, Problems, read_jsonl, report
from datamodules.diffvqa import SPLITS, LoadReport, Study, read_studies
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
    report_, samples = LoadReport(), []
    for line, record in read_jsonl(path, "prognostic questions: build them with `python -m datamodules.build "
                                         "prognostic`"):
        sample = _sample(path, line, record, split, studies, studies_path, mimic_root, problems)
        if sample is not None:
            samples.append(sample)
            report_.loaded["prognostic"] += 1
    return samples, report_


def _sample(path, line: int, record, split: str, studies: dict[int, Study], studies_path: Path,
            mimic_root: str | Path, problems: Problems | None) -> Sample | None:
    """The record's sample when it belongs to ``split``; None when it does not, or after reporting
    its problem."""
    def fail(field: str | None, problem: str, kind: str) -> None:
        report(problems, InputError(path, problem, line=line, field=field, kind=kind))

    if isinstance(record, InputError):
        return report(problems, record)
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        return fail(None, f"missing field(s) {missing}: rebuild the file with `python -m datamodules.build prognostic`",
                    "missing fields")
    if record["split"] not in SPLITS:
        return fail("split", f"unknown value {record['split']!r}; expected one of {SPLITS}", "unknown split")
    if record["split"] != split:
        return None
    current, prior = (studies.get(record[key]) for key in ("study_id", "ref_id"))
    for key, study in (("study_id", current), ("ref_id", prior)):
        if study is None:
            return fail(key, f"study {record[key]} is not in {studies_path}", f"{key} not in mimic_all.csv")
    interval = (current.study_date - prior.study_date).days
    if interval != record["interval_days"]:
        return fail("interval_days", f"{record['interval_days']} but {studies_path} gives {interval} days between "
                    f"studies {record['ref_id']} and {record['study_id']}", "interval_days")
    return Sample(
        sample_id=record["id"], task="prognostic", question_type="prognostic", question=record["question"],
        answer=record["answer"],
        image=image_path(mimic_root, current.subject_id, current.study_id, current.dicom_id),
        prior_image=image_path(mimic_root, prior.subject_id, prior.study_id, prior.dicom_id),
        interval_days=float(interval), subject_id=current.subject_id, study_id=current.study_id,
        prior_study_id=prior.study_id,
    )
