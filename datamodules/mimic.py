"""MIMIC-CXR-JPG (v2.0.0 / 2.1.0): its tables, image paths, and the study dates and times that the
interval between two studies comes from.

``load_images(root)`` gives one row per image: ids, ``split`` (``validate`` read as ``val``), ``view``
(``ViewPosition``, or the view code meaning when that is empty), ``study_datetime`` (``StudyDate`` +
the unpadded ``StudyTime``) and ``path``. Tables may be gzipped (as shipped) or not.
``dicom_study_datetime`` reads the same two tags from a DICOM header, for users who have the DICOMs.
"""

from __future__ import annotations

from datetime import date, datetime, time
from pathlib import Path

import pandas as pd

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


def parse_study_time(value: float | str) -> time:
    """``StudyTime`` is HHMMSS.ffffff without zero padding: ``80556.875`` is 08:05:56.875."""
    try:
        whole, _, fraction = f"{float(value):.6f}".partition(".")
    except ValueError:
        raise ValueError(f"StudyTime {value!r} is not a number HHMMSS.ffffff") from None
    hhmmss = whole.zfill(6)
    if len(hhmmss) != 6 or int(hhmmss[:2]) > 23 or int(hhmmss[2:4]) > 59 or int(hhmmss[4:]) > 59:
        raise ValueError(f"StudyTime {value!r} is not a time of day HHMMSS.ffffff")
    return time(int(hhmmss[:2]), int(hhmmss[2:4]), int(hhmmss[4:]), int(fraction))


def study_datetime(study_date: int | str, study_time: float | str) -> datetime:
    return datetime.combine(parse_study_date(study_date), parse_study_time(study_time))


# ViewPosition values (and, when it is empty, ViewCodeSequence_CodeMeaning values) -> one view name.
VIEWS = {
    "PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LL", "RL": "RL", "AP AXIAL": "AP AXIAL",
    "PA LLD": "PA LLD", "AP LLD": "AP LLD", "AP RLD": "AP RLD", "PA RLD": "PA RLD", "LAO": "LAO", "RAO": "RAO",
    "LPO": "LPO", "XTABLE LATERAL": "XTABLE LATERAL", "SWIMMERS": "SWIMMERS",
    "postero-anterior": "PA", "antero-posterior": "AP", "lateral": "LATERAL", "left lateral": "LL",
    "right lateral": "RL", "left anterior oblique": "LAO", "right anterior oblique": "RAO",
    "left posterior oblique": "LPO",
}
FRONTAL_VIEWS = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD")
SPLITS = {"train": "train", "validate": "val", "test": "test"}
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime",
                    "ViewCodeSequence_CodeMeaning"]


def read_table(root: str | Path, stem: str, columns: list[str]) -> pd.DataFrame:
    """``ROOT/{stem}.csv.gz`` or, unzipped, ``ROOT/{stem}.csv``, checked for ``columns``."""
    candidates = [Path(root) / f"{stem}.csv.gz", Path(root) / f"{stem}.csv"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"neither {candidates[0]} nor {candidates[1]} exists: set paths.mimic_cxr_jpg to the MIMIC-CXR-JPG root"
        )
    table = pd.read_csv(path, dtype={"dicom_id": str})
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (found {list(table.columns)})")
    return table


def _view(position, meaning) -> str:
    """The mapped view; a value missing from ``VIEWS`` is kept as written (upper-cased), an image
    with neither field is ``UNKNOWN``."""
    for value in (position, meaning):
        if isinstance(value, str) and value.strip():
            return VIEWS.get(value.strip(), value.strip().upper())
    return "UNKNOWN"


def load_images(root: str | Path) -> pd.DataFrame:
    """One row per image of the metadata table, with its split, view, study date-time and path."""
    metadata = read_table(root, "mimic-cxr-2.0.0-metadata", METADATA_COLUMNS)
    split = read_table(root, "mimic-cxr-2.0.0-split", ["dicom_id", "split"])
    metadata_path = f"{root}/mimic-cxr-2.0.0-metadata.csv[.gz]"
    unknown = split.loc[~split["split"].isin(list(SPLITS)), "split"]
    if len(unknown):
        raise ValueError(f"{root}/mimic-cxr-2.0.0-split.csv[.gz] row {unknown.index[0]}, field split: "
                         f"unknown value {unknown.iloc[0]!r} (expected one of {list(SPLITS)})")
    images = metadata.merge(split[["dicom_id", "split"]], on="dicom_id", how="left", validate="one_to_one")
    without_split = images.loc[images["split"].isna(), "dicom_id"]
    if len(without_split):
        raise ValueError(f"{metadata_path}: {len(without_split)} images have no row in the split table, "
                         f"e.g. dicom_id {without_split.iloc[0]}")
    times = []
    for row, (study_date, study_time) in enumerate(zip(images["StudyDate"], images["StudyTime"])):
        try:
            times.append(study_datetime(study_date, study_time))
        except ValueError as error:
            raise ValueError(f"{metadata_path} row {row}, fields StudyDate/StudyTime: {error}") from None
    return pd.DataFrame({
        "dicom_id": images["dicom_id"],
        "subject_id": images["subject_id"].astype(int),
        "study_id": images["study_id"].astype(int),
        "split": images["split"].map(SPLITS),
        "view": [_view(p, m) for p, m in zip(images["ViewPosition"], images["ViewCodeSequence_CodeMeaning"])],
        "study_datetime": times,
        "path": [image_path(root, s, t, d) for s, t, d in zip(images["subject_id"], images["study_id"], images["dicom_id"])],
    })


def load_chexpert(root: str | Path, labeler: str = "chexpert") -> pd.DataFrame:
    """Per-study labels (``chexpert`` or ``negbio``): 1.0 positive, 0.0 negative, -1.0 uncertain, NaN unmentioned."""
    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"labeler={labeler!r}: expected 'chexpert' or 'negbio'")
    return read_table(root, f"mimic-cxr-2.0.0-{labeler}", ["subject_id", "study_id", *CHEXPERT_LABELS])


def dicom_study_datetime(path: str | Path) -> datetime:
    """``StudyDate`` + ``StudyTime`` from a DICOM file's header (pixel data is not read)."""
    import pydicom
    from pydicom.valuerep import DA, TM

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate", "StudyTime"])
    if not header.get("StudyDate") or not header.get("StudyTime"):
        raise ValueError(f"{path}: the DICOM header has no StudyDate/StudyTime")
    # DICOM DA/TM are zero-padded (TM may stop after HH or HHMM): pydicom's own parsers read them.
    return datetime.combine(DA(header.StudyDate), TM(header.StudyTime))
