"""MIMIC-CXR-JPG (v2.0.0 / 2.1.0): its tables, image paths, and the study dates and times that the
interval between two studies comes from.

``load_images(root)`` gives one row per image: ids, ``split`` (``validate`` read as ``val``), ``view``
(``ViewPosition``, or the view code meaning when that is empty), ``study_datetime`` (``StudyDate`` +
the unpadded ``StudyTime``) and ``path`` (the JPEG's, as a string). Tables may be gzipped (as shipped) or not.
``dicom_study_datetime`` reads the same two tags from a DICOM header, for users who have the DICOMs.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common.readers import InputError, Problems, Table, read_all, read_csv, raise_or_record

# The 14 labels of mimic-cxr-2.0.0-chexpert.csv (and -negbio.csv), in the file's column order.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)


def image_path(root: str | Path, subject_id: int, study_id: int, dicom_id: str) -> Path:
    """``files/p{first two digits}/p{subject}/s{study}/{dicom}.jpg`` under the MIMIC-CXR-JPG root."""
    subject = str(int(subject_id))
    # One Path from one string: joining five parts costs five parses, which shows at 377k images.
    return Path(f"{root}/files/p{subject[:2]}/p{subject}/s{int(study_id)}/{dicom_id}.jpg")


def image_paths(mimic_root: str | Path, subject_ids, study_ids, dicom_ids) -> pa.Array:
    """``image_path`` of many images at once, as Arrow strings (a ``Path`` is made when an image is read)."""
    subjects = pa.array(np.asarray(subject_ids, dtype=np.int64)).cast(pa.string())
    studies = pa.array(np.asarray(study_ids, dtype=np.int64)).cast(pa.string())
    dicom_ids = dicom_ids if isinstance(dicom_ids, (pa.Array, pa.ChunkedArray)) else \
        pa.array(np.asarray(dicom_ids, dtype=object), pa.string())
    files = str(Path(f"{mimic_root}/files"))  # as image_path's Path would write it
    return pc.binary_join_element_wise(f"{files}/p", pc.utf8_slice_codeunits(subjects, 0, 2), "/p", subjects, "/s",
                                       studies, "/", dicom_ids, ".jpg", "")


def parse_study_date(value: int | float | str) -> date:
    """``StudyDate`` is an integer YYYYMMDD (date-shifted into 2100-2200)."""
    text = str(value).strip().removesuffix(".0")  # a float when the column has an empty value
    try:
        if len(text) != 8 or not text.isdigit():
            raise ValueError
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise ValueError(f"StudyDate {value!r} is not a date YYYYMMDD") from None


def whole_number(value: int | float | str) -> int:
    """An identifier as an integer, also when pandas read its column as floats or text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():  # NaN and infinities too
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


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
RESTORE = "restore the row from the original PhysioNet file"
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime",
                    "ViewCodeSequence_CodeMeaning"]


def table_path(root: str | Path, stem: str) -> Path:
    """``ROOT/{stem}.csv.gz`` as shipped or, unzipped, ``ROOT/{stem}.csv``."""
    gzipped, plain = Path(root) / f"{stem}.csv.gz", Path(root) / f"{stem}.csv"
    if not gzipped.is_file() and not plain.is_file():
        raise InputError(gzipped, f"not found, nor {plain.name}: set paths.mimic_cxr_jpg to the MIMIC-CXR-JPG root "
                                  "(the directory holding files/ and the mimic-cxr-2.0.0-*.csv.gz tables)")
    return gzipped if gzipped.is_file() else plain


def read_table(root: str | Path, stem: str, columns: list[str]) -> Table:
    """A MIMIC-CXR-JPG table, checked for ``columns``."""
    return read_csv(table_path(root, stem), columns, f"MIMIC-CXR-JPG's {stem} table", dtype={"dicom_id": str})


def _view(position, meaning) -> str:
    """The mapped view; a value missing from ``VIEWS`` is kept as written (upper-cased), an image
    with neither field is ``UNKNOWN``."""
    for value in (position, meaning):
        if isinstance(value, str) and value.strip():
            return VIEWS.get(value.strip(), value.strip().upper())
    return "UNKNOWN"


def _whole_numbers(table: Table, column: str, skip: set[int], problems: Problems | None) -> pd.Series:
    """``column`` as integers; a row whose value is not a whole number is reported and added to ``skip``."""
    values = pd.to_numeric(table.frame[column], errors="coerce")
    for row in table.frame.index[values.isna() | (values % 1 != 0)]:
        if row not in skip:
            raise_or_record(problems, table.error(row, column, f"{table.frame.at[row, column]!r} is not a whole number",
                                         fix=RESTORE, kind=f"malformed {column}"))
            skip.add(row)
    return values.fillna(-1).astype("int64")


def _split_of(table: Table, problems: Problems | None) -> tuple[dict[str, str], set[str]]:
    """dicom_id -> ``train``/``val``/``test`` from the split table, and the dicom_ids whose split row
    was rejected (an empty, unknown or repeated value, each reported)."""
    split_of, first_row, rejected = {}, {}, set()
    for row, (dicom_id, split) in enumerate(zip(table.frame["dicom_id"].tolist(), table.frame["split"].tolist())):
        if pd.isna(dicom_id):
            problem = ("dicom_id", "empty", RESTORE, "empty dicom_id")
        elif dicom_id in first_row:
            problem = ("dicom_id", f"{dicom_id} repeats line {table.line(first_row[dicom_id])}", "each image has one row",
                       "repeated dicom_id")
        elif split not in SPLITS:
            problem = ("split", "empty" if pd.isna(split) else f"unknown value {split!r}",
                       f"expected one of {list(SPLITS)}", "unknown split")
        else:
            first_row[dicom_id], split_of[dicom_id] = row, SPLITS[split]
            continue
        raise_or_record(problems, table.error(row, problem[0], problem[1], fix=problem[2], kind=problem[3]))
        rejected.add(dicom_id)
        split_of.pop(dicom_id, None)
    return split_of, rejected


def load_images(root: str | Path, problems: Problems | None = None) -> pd.DataFrame:
    """One row per image of the metadata table, with its split, view, study date-time and path.
    A row with a missing or malformed value, a repeated ``dicom_id`` or no split is an error (with
    ``problems``: recorded and left out, its dicom_id in ``attrs["rejected"]``). Tables without such
    a row are read column by column; otherwise row by row, each problem reported as the rows come."""
    metadata, splits = read_all(problems, lambda: read_table(root, "mimic-cxr-2.0.0-metadata", METADATA_COLUMNS),
                                lambda: read_table(root, "mimic-cxr-2.0.0-split", ["dicom_id", "split"]))
    images = _clean_images(root, metadata, splits)
    return images if images is not None else _checked_images(root, metadata, splits, problems)


def _images(root, dicom_ids: list, subjects: list, studies: list, split_names: list, views: list,
            times: list) -> pd.DataFrame:
    return pd.DataFrame({
        "dicom_id": dicom_ids, "subject_id": subjects, "study_id": studies, "split": split_names, "view": views,
        "study_datetime": times,
        # Strings until an image is opened: a Path per image costs seconds at 377k.
        "path": image_paths(root, subjects, studies, dicom_ids).to_pandas(),
    })


def _clean_images(root, metadata: Table, splits: Table) -> pd.DataFrame | None:
    """The images read column by column, or None when a row of either table has a problem."""
    frame, split_frame = metadata.frame, splits.frame
    required = ["dicom_id", "subject_id", "study_id", "StudyDate", "StudyTime"]
    if frame[required].isna().any().any() or frame["dicom_id"].duplicated().any():
        return None
    if split_frame["dicom_id"].isna().any() or split_frame["dicom_id"].duplicated().any() \
            or not split_frame["split"].isin(list(SPLITS)).all():
        return None
    dicom_ids = frame["dicom_id"].to_numpy(dtype=object)
    split_rows = pd.Index(split_frame["dicom_id"].to_numpy(dtype=object)).get_indexer(dicom_ids)
    if (split_rows < 0).any():
        return None
    codes, names = pd.factorize(split_frame["split"].to_numpy(dtype=object))
    split_names = np.array([SPLITS[name] for name in names], dtype=object)[codes][split_rows]
    numbers = {column: pd.to_numeric(frame[column], errors="coerce") for column in ("subject_id", "study_id")}
    if any(values.isna().any() or (values % 1 != 0).any() for values in numbers.values()):
        return None
    moments = study_datetimes(frame["StudyDate"], frame["StudyTime"])
    if moments is None:
        return None
    views, view_names = pd.factorize(pd.MultiIndex.from_arrays(
        [frame["ViewPosition"].to_numpy(dtype=object), frame["ViewCodeSequence_CodeMeaning"].to_numpy(dtype=object)]))
    images = _images(
        root, dicom_ids, numbers["subject_id"].to_numpy(dtype=np.int64), numbers["study_id"].to_numpy(dtype=np.int64),
        split_names, np.array([_view(*names) for names in view_names], dtype=object)[views], moments.astype(object))
    images.attrs["rejected"] = set()
    return images


def study_datetimes(dates: pd.Series, times: pd.Series) -> np.ndarray | None:
    """``study_datetime`` of every row (datetime64[us]) as ``parse_study_date`` and ``parse_study_time``
    read them, or None when a value is not one they read."""
    codes, distinct = pd.factorize(dates)  # a few thousand dates
    try:
        days = np.array([parse_study_date(value) for value in distinct], dtype="datetime64[D]")
    except ValueError:
        return None
    seconds = pd.to_numeric(times, errors="coerce").to_numpy(dtype=np.float64)
    if codes.min(initial=0) < 0 or not (np.isfinite(seconds).all() and (seconds >= 0).all() and (seconds < 1e6).all()):
        return None
    # HHMMSS.ffffff to the microsecond, as f"{value:.6f}" rounds it; a value whose rounding the product
    # could get wrong (its millionths within a thousandth of a half) is read by parse_study_time itself.
    scaled = seconds * 1e6
    micro = np.round(scaled).astype(np.int64)
    close = np.flatnonzero(np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3)
    for row in close:
        moment = parse_study_time(seconds[row])
        micro[row] = ((moment.hour * 100 + moment.minute) * 100 + moment.second) * 1_000_000 + moment.microsecond
    whole, fraction = np.divmod(micro, 1_000_000)
    hours, minutes, second = whole // 10_000, whole // 100 % 100, whole % 100
    if not ((whole < 1_000_000) & (hours <= 23) & (minutes <= 59) & (second <= 59)).all():
        return None
    since_midnight = ((hours * 60 + minutes) * 60 + second) * 1_000_000 + fraction
    return days[codes].astype("datetime64[us]") + since_midnight.astype("timedelta64[us]")


def _checked_images(root, metadata: Table, splits: Table, problems: Problems | None) -> pd.DataFrame:
    """The images read row by row: each problem reported as ``load_images`` says."""
    split_of, rejected = _split_of(splits, problems)
    frame = metadata.frame
    skip = metadata.missing_values(["dicom_id", "subject_id", "study_id", "StudyDate", "StudyTime"], problems,
                                   fix=RESTORE)
    subject_ids, study_ids = (_whole_numbers(metadata, column, skip, problems) for column in ("subject_id", "study_id"))
    first_row: dict[str, int] = {}
    rows, times = [], []
    columns = (frame[name].tolist() for name in ("dicom_id", "StudyDate", "StudyTime"))
    for row, (dicom_id, study_date, study_time) in enumerate(zip(*columns)):
        if row in skip:
            continue
        if dicom_id in first_row:
            raise_or_record(problems, metadata.error(row, "dicom_id", f"{dicom_id} repeats line {metadata.line(first_row[dicom_id])}",
                                            fix="each image has one row", kind="repeated dicom_id"))
            continue
        first_row[dicom_id] = row
        if dicom_id in rejected:  # its split row was reported
            continue
        if dicom_id not in split_of:
            raise_or_record(problems, metadata.error(row, "dicom_id", f"{dicom_id} has no row in the split table",
                                            fix="use the split table of the same MIMIC-CXR-JPG release",
                                            kind="no split"))
            continue
        try:
            day = parse_study_date(study_date)
        except ValueError as error:
            raise_or_record(problems, metadata.error(row, "StudyDate", str(error), fix=RESTORE, kind="malformed StudyDate"))
            continue
        try:
            moment = parse_study_time(study_time)
        except ValueError as error:
            raise_or_record(problems, metadata.error(row, "StudyTime", str(error), fix=RESTORE, kind="malformed StudyTime"))
            continue
        rows.append(row)
        times.append(datetime.combine(day, moment))
    kept = frame.loc[rows]
    dicom_ids, subjects, studies = kept["dicom_id"].tolist(), subject_ids[rows].tolist(), study_ids[rows].tolist()
    images = _images(root, dicom_ids, subjects, studies, [split_of[dicom_id] for dicom_id in dicom_ids],
                     [_view(p, m) for p, m in zip(kept["ViewPosition"].tolist(),
                                                  kept["ViewCodeSequence_CodeMeaning"].tolist())], times)
    # Images whose row was reported and left out: a cross-check names them as such, not as missing.
    images.attrs["rejected"] = (set(frame["dicom_id"].dropna()) - set(dicom_ids)) | rejected
    return images


def load_chexpert(root: str | Path, labeler: str = "chexpert") -> pd.DataFrame:
    """Per-study labels (``chexpert`` or ``negbio``): 1.0 positive, 0.0 negative, -1.0 uncertain, NaN unmentioned."""
    if labeler not in ("chexpert", "negbio"):
        raise ValueError(f"labeler={labeler!r}: expected 'chexpert' or 'negbio'")
    return read_table(root, f"mimic-cxr-2.0.0-{labeler}", ["subject_id", "study_id", *CHEXPERT_LABELS]).frame


def dicom_study_datetime(path: str | Path) -> datetime:
    """``StudyDate`` + ``StudyTime`` from a DICOM file's header (pixel data is not read)."""
    import pydicom
    from pydicom.valuerep import DA, TM

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate", "StudyTime"])
    if not header.get("StudyDate") or not header.get("StudyTime"):
        raise ValueError(f"{path}: the DICOM header has no StudyDate/StudyTime")
    # DICOM DA/TM are zero-padded (TM may stop after HH or HHMM): pydicom's own parsers read them.
    return datetime.combine(DA(header.StudyDate), TM(header.StudyTime))
