"""The MIMIC-CXR-JPG adapter: tables (gzipped or not), unpadded times, views, splits, DICOM headers."""

import gzip
from datetime import datetime, time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.readers import InputError
from datamodules.mimic import (
    METADATA_COLUMNS,
    _checked_images,
    _clean_images,
    dicom_study_datetime,
    image_path,
    load_chexpert,
    load_images,
    parse_study_time,
    read_table,
    study_datetime,
    study_datetimes,
)

HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
          "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
          "PatientOrientationCodeSequence_CodeMeaning")
ROWS = [
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,"
    "213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),,3056,2544,21800506,"
    "213014.531,CHEST (PA AND LAT),lateral,Erect",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PORTABLE AP),AP,2705,2539,21800626,"
    "80556.875,CHEST (PORTABLE AP),antero-posterior,Recumbent",
]
SPLIT = ["dicom_id,study_id,subject_id,split",
         "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train",
         "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train",
         "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,validate"]


def write(root, gzipped: bool, metadata_rows=ROWS, split_rows=SPLIT):
    root.mkdir(parents=True, exist_ok=True)
    for stem, lines in (("mimic-cxr-2.0.0-metadata", [HEADER, *metadata_rows]), ("mimic-cxr-2.0.0-split", split_rows)):
        text = "\n".join(lines) + "\n"
        if gzipped:
            with gzip.open(root / f"{stem}.csv.gz", "wt") as handle:
                handle.write(text)
        else:
            (root / f"{stem}.csv").write_text(text)
    return root


@pytest.mark.parametrize("gzipped", [True, False])
def test_images_table_reads_gzipped_and_plain_tables_alike(tmp_path, gzipped):
    images = load_images(write(tmp_path / "mimic", gzipped))
    assert images["split"].tolist() == ["train", "train", "val"]
    assert images["view"].tolist() == ["PA", "LATERAL", "AP"]  # empty ViewPosition -> the code meaning
    assert images["study_datetime"].tolist() == [datetime(2180, 5, 6, 21, 30, 14, 531000)] * 2 + [
        datetime(2180, 6, 26, 8, 5, 56, 875000)]
    assert images["path"][0] == str(image_path(tmp_path / "mimic", 10000032, 50414267,
                                               "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"))
    assert str(images["path"][0]).endswith("files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg")


def test_views_without_a_mapping_are_kept_and_missing_ones_marked(tmp_path):
    rows = [ROWS[0].replace(",PA,", ",,").replace("postero-anterior", "Skyline"),
            ROWS[1].replace(",lateral,", ",,"), ROWS[2]]
    images = load_images(write(tmp_path / "mimic", True, metadata_rows=rows))
    assert images["view"].tolist() == ["SKYLINE", "UNKNOWN", "AP"]


@pytest.mark.parametrize(("value", "expected"), [
    (80556.875, time(8, 5, 56, 875000)), ("213014.531", time(21, 30, 14, 531000)), (5.0, time(0, 0, 5)),
    (120000, time(12, 0, 0)),
])
def test_unpadded_study_time(value, expected):
    assert parse_study_time(value) == expected


@pytest.mark.parametrize("value", ["noon", 256000.0, 1234567.0])
def test_impossible_study_time_is_an_error(value):
    with pytest.raises(ValueError, match="StudyTime"):
        parse_study_time(value)


def test_a_bad_time_names_the_file_row_and_fields(tmp_path):
    rows = [ROWS[0], ROWS[1].replace("213014.531", "996014.531"), ROWS[2]]
    with pytest.raises(InputError, match=r"metadata.csv.gz line 3, field StudyTime: StudyTime 996014.531 is not a time"):
        load_images(write(tmp_path / "mimic", True, metadata_rows=rows))


def test_unknown_split_value_is_an_error(tmp_path):
    split = [*SPLIT[:3], SPLIT[3].replace("validate", "dev")]
    with pytest.raises(InputError, match=r"split.csv.gz line 4, field split: unknown value 'dev'; expected one of "
                                         r"\['train', 'validate', 'test'\]"):
        load_images(write(tmp_path / "mimic", True, split_rows=split))


def test_image_without_split_row_is_an_error(tmp_path):
    with pytest.raises(InputError, match=r"metadata.csv.gz line 4, field dicom_id: .* has no row in the split table"):
        load_images(write(tmp_path / "mimic", True, split_rows=SPLIT[:3]))


def test_missing_tables_and_columns_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="mimic-cxr-2.0.0-metadata.csv.gz: not found, nor mimic-cxr-2.0.0-metadata.csv"):
        load_images(tmp_path)
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").write_text("subject_id,study_id,Atelectasis\n1,2,1.0\n")
    with pytest.raises(ValueError, match="missing columns .*Cardiomegaly"):
        load_chexpert(tmp_path)


def test_synthetic_world_tables_load_with_every_image_on_disk(world):
    root = world / "mimic-cxr-jpg"
    images = load_images(root)
    assert len(images) == len(read_table(root, "mimic-cxr-2.0.0-metadata", []).frame)
    assert set(images["split"]) <= {"train", "val", "test"} and "val" in set(images["split"])
    assert set(images["view"]) <= {"PA", "AP", "LATERAL"}
    assert all(Path(path).is_file() for path in images["path"])
    labels = load_chexpert(root)
    assert set(labels["study_id"]) == set(images["study_id"])


def test_study_date_and_time_from_a_dicom_header(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.StudyDate, dataset.StudyTime = "21800626", "080556.875"
    dataset.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    assert dicom_study_datetime(tmp_path / "image.dcm") == datetime(2180, 6, 26, 8, 5, 56, 875000)

    dataset.StudyTime = "0805"  # DICOM TM may stop after the minutes
    dataset.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    assert dicom_study_datetime(tmp_path / "short.dcm") == datetime(2180, 6, 26, 8, 5)

    del dataset.StudyTime
    dataset.save_as(tmp_path / "none.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match="no StudyDate/StudyTime"):
        dicom_study_datetime(tmp_path / "none.dcm")


def test_study_times_read_column_by_column_are_those_read_one_by_one():
    """Including times whose microseconds f"{value:.6f}" rounds from a half."""
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 24, 4000) * 10_000 + rng.integers(0, 60, 4000) * 100 + rng.integers(0, 60, 4000)
    times = np.concatenate([whole + rng.integers(0, 1_000_000, 4000) / 1e6, whole + rng.integers(0, 1000, 4000) / 1e3,
                            whole.astype(float), [80556.875, 0.0000005, 0.0000015, 235959.9999995, 5.5, 100.25]])
    dates = pd.Series(rng.choice([21500101, 21800229 - 100, 21991231], len(times)))
    moments = study_datetimes(dates, pd.Series(times))
    expected = [study_datetime(day, time) for day, time in zip(dates, times)]
    assert moments.astype(object).tolist() == expected


@pytest.mark.parametrize("time", [-5.0, 240000.0, 126000.0, 1e20, float("nan")])
def test_a_study_time_that_is_not_a_time_of_day_is_left_to_the_row_by_row_reading(time):
    assert study_datetimes(pd.Series([21500101]), pd.Series([time])) is None


def test_the_tables_read_column_by_column_are_those_read_row_by_row(world, tmp_path):
    root = world / "mimic-cxr-jpg"
    metadata = read_table(root, "mimic-cxr-2.0.0-metadata", METADATA_COLUMNS)
    metadata.frame.loc[::7, "ViewPosition"] = float("nan")  # the view from the code meaning, or UNKNOWN
    metadata.frame.loc[::14, "ViewCodeSequence_CodeMeaning"] = float("nan")
    splits = read_table(root, "mimic-cxr-2.0.0-split", ["dicom_id", "split"])
    columns, rows = _clean_images(root, metadata, splits), _checked_images(root, metadata, splits, None)
    assert columns.equals(rows) and (columns.dtypes == rows.dtypes).all()
    assert {"UNKNOWN", "PA"} <= set(columns["view"])
