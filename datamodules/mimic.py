"""MIMIC-CXR-JPG: image paths and the study-date arithmetic the interval embedding needs."""

from __future__ import annotations

from datetime import date
from pathlib import Path

# The 14 labels of mimic-cxr-2.0.0-chexpert.csv (and -negbio.csv), in the file's column order.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)


def image_path(root: str | Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """``files/p{first two digits}/p{subject}/s{study}/{dicom}.jpg`` under the MIMIC-CXR-JPG root."""
    subject = str(int(subject_id))
    return Path(root) / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{int(study_id)}" / f"{dicom_id}.jpg"


def parse_study_date(value: int | str) -> date:
    """``StudyDate`` is an integer YYYYMMDD (date-shifted into 2100-2200)."""
    text = str(int(value))
    if len(text) != 8:
        raise ValueError(f"StudyDate {value!r} is not YYYYMMDD")
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def days_between(later: int | str, earlier: int | str) -> int:
    """``StudyDate(later) - StudyDate(earlier)`` in days (negative when ``earlier`` is in fact later)."""
    return (parse_study_date(later) - parse_study_date(earlier)).days
