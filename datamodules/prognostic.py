"""Prognostic instructions (LUMEN): the loader of the JSONL that ``datamodules.prognostic_builder``
(``python -m datamodules.build prognostic``) and the synthetic world write. One JSON object per question:

    {"id": "prognostic-<row>", "source_sample_id": "diffvqa-<row>", "source_row": <row>,
     "split", "subject_id", "study_id", "ref_id", "interval_days",
     "difference_question", "difference_answer", "template_id", "days", "question", "answer",
     "backend": "rules" | "llm" | "synthetic-truth", "model": <LLM or null>, "prompt_version"}

``row`` counts data rows of ``mimic_pair_questions.csv`` from 0, as the Diff-VQA adapter does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from datamodules.diffvqa import SPLITS, STUDY_COLUMNS, LoadReport
from datamodules.mimic import days_between, image_path
from datamodules.records import Sample

RECORD_KEYS = (
    "id", "source_sample_id", "source_row", "split", "subject_id", "study_id", "ref_id", "interval_days",
    "difference_question", "difference_answer", "template_id", "days", "question", "answer", "backend",
    "model", "prompt_version",
)


def load_prognostic(path: str | Path, diffvqa_dir: str | Path, mimic_root: str | Path,
                    split: str) -> tuple[list[Sample], LoadReport]:
    """Samples of one split of a prognostic JSONL: the current and prior study's images (through
    Diff-VQA's ``mimic_all.csv``) and the interval between them; ``sample_id`` is the record's ``id``."""
    if split not in SPLITS:
        raise ValueError(f"unknown prognostic split {split!r}: expected one of {SPLITS}")
    path, studies_path = Path(path), Path(diffvqa_dir) / "mimic_all.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build it with `python -m datamodules.build prognostic`")
    studies = {row.study_id: row for row in pd.read_csv(studies_path, usecols=STUDY_COLUMNS).itertuples(index=False)}
    report, samples = LoadReport(), []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error})") from None
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if record["split"] not in SPLITS:
            raise ValueError(f"{where}, field split: unknown value {record['split']!r}; expected one of {SPLITS}")
        if record["split"] != split:
            continue
        current, prior = (studies.get(record[key]) for key in ("study_id", "ref_id"))
        for key, study in (("study_id", current), ("ref_id", prior)):
            if study is None:
                raise KeyError(f"{where}, field {key}: study {record[key]} is not in {studies_path}")
        interval = days_between(current.study_date, prior.study_date)
        if interval != record["interval_days"]:
            raise ValueError(f"{where}, field interval_days: {record['interval_days']} but {studies_path} gives "
                             f"{interval} days between studies {record['ref_id']} and {record['study_id']}")
        samples.append(Sample(
            sample_id=record["id"], task="prognostic", question_type="prognostic", question=record["question"],
            answer=record["answer"],
            image=image_path(mimic_root, current.subject_id, current.study_id, current.dicom_id),
            prior_image=image_path(mimic_root, prior.subject_id, prior.study_id, prior.dicom_id),
            interval_days=float(interval), subject_id=int(current.subject_id), study_id=int(current.study_id),
            prior_study_id=int(prior.study_id),
        ))
        report.loaded["prognostic"] += 1
    return samples, report
