"""Reading a chest X-ray file, DICOM or image (``datamodules.dicom``), checked on synthetic DICOM files
written from a world radiograph (``datamodules.synthetic.dicoms``) in the forms archives produce."""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.tag import Tag
from pydicom.uid import MPEG2MPML

from common.readers import InputError
from datamodules import dicom
from datamodules.datamodule import SampleDataset
from datamodules.dicom import equalize_histogram, is_dicom, read_study_file
from datamodules.records import Sample
from datamodules.synthetic.dicoms import main, write_dicom

PATIENT_ID, PATIENT_NAME = "PID-7731-SECRET", "Doe^Jane"


@pytest.fixture(scope="module")
def radiograph(world) -> np.ndarray:
    """One of the synthetic world's chest radiographs, as 8-bit grey levels."""
    first = sorted((world / "mimic-cxr-jpg" / "files").rglob("*.jpg"))[0]
    with Image.open(first) as image:
        return np.asarray(image.convert("L"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(read_study_file(path).image)


def rewritten(path: Path, out: Path, change) -> Path:
    """A copy of the DICOM at ``path`` with ``change(dataset)`` applied: the malformed files a reader meets."""
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(out, enforce_file_format=True)
    return out


def equalized_by_definition(grey: np.ndarray) -> np.ndarray:
    """OpenCV's ``equalizeHist`` from its definition, in exact fractions rather than its single-precision
    code: the lowest level present goes to 0, any level v to 255 * (pixels at or below v - pixels at the
    lowest) / (pixels - pixels at the lowest), to the nearest level (ties to even, as cvRound)."""
    levels, counts = np.unique(grey, return_counts=True)
    at_lowest, total = int(counts[0]), grey.size
    equalized = {int(level): round(Fraction(255 * (int(at_or_below) - at_lowest), total - at_lowest))
                 for level, at_or_below in zip(levels, np.cumsum(counts))}
    return np.vectorize(equalized.__getitem__)(grey).astype(np.uint8)


@pytest.mark.parametrize(("bits", "rescale", "window"), [
    (8, (1.0, 0.0), None),
    (12, (1.0, 0.0), None),
    (16, (1.0, 0.0), None),
    (8, (1.0, 0.0), (100.0, 120.0)),
    (16, (0.25, -1024.0), (5000.0, 9000.0)),
])
def test_a_monochrome1_file_is_inverted_back_to_its_monochrome2_twin(radiograph, tmp_path, bits, rescale, window):
    monochrome2 = write_dicom(radiograph, tmp_path / "m2.dcm", bits_stored=bits, rescale=rescale, window=window,
                              photometric="MONOCHROME2")
    monochrome1 = write_dicom(radiograph, tmp_path / "m1.dcm", bits_stored=bits, rescale=rescale, window=window,
                              photometric="MONOCHROME1")
    assert not np.array_equal(pydicom.dcmread(monochrome1).pixel_array, pydicom.dcmread(monochrome2).pixel_array)
    assert np.array_equal(pixels(monochrome1), pixels(monochrome2))


@pytest.mark.parametrize(("photometric", "bits", "window"), [
    ("MONOCHROME2", 8, None),
    ("MONOCHROME2", 12, (1500.0, 2000.0)),
    ("MONOCHROME1", 12, None),
])
def test_an_inverse_presentation_lut_shape_shows_the_stored_values_inverted_once(radiograph, tmp_path, photometric,
                                                                                 bits, window):
    """INVERSE on MONOCHROME2 inverts; on MONOCHROME1 it is how the standard says MONOCHROME1 (PS3.3
    C.7.6.1), not a second inversion."""
    plain = write_dicom(radiograph, tmp_path / "plain.dcm", bits_stored=bits, window=window)
    inverse = write_dicom(radiograph, tmp_path / "inverse.dcm", bits_stored=bits, window=window,
                          photometric=photometric, presentation_lut_shape="INVERSE")
    written = pydicom.dcmread(inverse)
    assert (written.PhotometricInterpretation, written.PresentationLUTShape) == (photometric, "INVERSE")
    assert np.array_equal(written.pixel_array, 2 ** bits - 1 - pydicom.dcmread(plain).pixel_array)
    assert np.array_equal(pixels(inverse), pixels(plain))


@pytest.mark.parametrize(("grey", "expected"), [
    # 16 pixels: 5 black (a border), 3 at 60, 4 at 128, 4 saturated. A level v goes to
    # 255 * (pixels <= v - 5) / (16 - 5): 0 to 0, 60 to 255*3/11 = 69.55 -> 70, 128 to 255*7/11 = 162.27
    # -> 162, 255 to 255*11/11 = 255.
    ([[0, 0, 0, 0], [0, 60, 60, 60], [128, 128, 128, 128], [255, 255, 255, 255]],
     [[0, 0, 0, 0], [0, 70, 70, 70], [162, 162, 162, 162], [255, 255, 255, 255]]),
    # Neither black nor white: the lowest level (20, 2 pixels) still goes to 0, the highest (90) to 255,
    # and 40 to 255*(6-2)/(9-2) = 145.71 -> 146.
    ([[20, 40, 90], [40, 20, 90], [40, 40, 90]],
     [[0, 146, 255], [146, 0, 255], [146, 146, 255]]),
])
def test_equalisation_is_opencvs_equalize_hist_as_worked_by_hand(grey, expected):
    assert equalize_histogram(np.array(grey, dtype=np.uint8)).tolist() == expected


@pytest.mark.parametrize("level", [0, 77, 255])
def test_equalising_an_image_of_one_grey_level_leaves_it_as_it_is(level):
    grey = np.full((3, 5), level, dtype=np.uint8)
    assert np.array_equal(equalize_histogram(grey), grey)


def test_a_16_bit_file_is_rescaled_windowed_scaled_and_equalised_as_computed_by_hand(radiograph, tmp_path):
    slope, intercept, center, width = 0.25, -1024.0, 5000.0, 9000.0
    path = write_dicom(radiograph, tmp_path / "16bit.dcm", bits_stored=16, rescale=(slope, intercept),
                       window=(center, width))
    stored = np.rint(radiograph.astype(np.float64) * 65535 / 255)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, stored)
    modality = stored * slope + intercept
    # DICOM PS3.3 C.11.2.1.2.1, the linear window, to [0, 1].
    windowed = np.clip((modality - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    scaled = np.rint((windowed - windowed.min()) / (windowed.max() - windowed.min()) * 255).astype(np.uint8)
    expected = equalized_by_definition(scaled)
    assert np.array_equal(pixels(path), expected)
    # The window matters: the values it clips would otherwise stretch the scale.
    unwindowed = np.rint((modality - modality.min()) / (modality.max() - modality.min()) * 255).astype(np.uint8)
    assert not np.array_equal(equalized_by_definition(unwindowed), expected)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_each_voi_lut_function_windows_as_pydicoms_reference_implementation(radiograph, tmp_path, function):
    """A window placed where the three differ in the equalised image: LINEAR shows grey level 120 as white
    (its top edge is c + w/2 - 1 = 119.25), LINEAR_EXACT just below white (its edge is c + w/2 = 120.25),
    SIGMOID nothing quite white."""
    def windowed_by(dataset):
        dataset.VOILUTFunction = function

    path = rewritten(write_dicom(radiograph, tmp_path / "linear.dcm", window=(100.25, 40.0)),
                     tmp_path / "windowed.dcm", windowed_by)
    dataset = pydicom.dcmread(path)
    windowed = apply_windowing(apply_modality_lut(dataset.pixel_array, dataset), dataset)
    scaled = np.rint((windowed - windowed.min()) / (windowed.max() - windowed.min()) * 255).astype(np.uint8)
    assert np.array_equal(pixels(path), equalized_by_definition(scaled))


def test_a_file_with_several_windows_is_shown_through_its_first(radiograph, tmp_path):
    first = write_dicom(radiograph, tmp_path / "first.dcm", bits_stored=12, window=(1500.0, 2000.0))

    def two_windows(dataset):
        dataset.WindowCenter, dataset.WindowWidth = [1500.0, 3000.0], [2000.0, 500.0]

    both = rewritten(first, tmp_path / "both.dcm", two_windows)
    second = write_dicom(radiograph, tmp_path / "second.dcm", bits_stored=12, window=(3000.0, 500.0))
    assert np.array_equal(pixels(both), pixels(first))
    assert not np.array_equal(pixels(both), pixels(second))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_jpeg_2000_lossless_reads_exactly_as_uncompressed(radiograph, tmp_path, bits):
    uncompressed = write_dicom(radiograph, tmp_path / "raw.dcm", bits_stored=bits)
    compressed = write_dicom(radiograph, tmp_path / "j2k.dcm", bits_stored=bits, compression="jpeg2000-lossless")
    assert read_study_file(compressed).transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert compressed.stat().st_size < uncompressed.stat().st_size
    assert np.array_equal(pixels(compressed), pixels(uncompressed))


def test_lossy_jpeg_baseline_stays_within_its_quantisation_error(tmp_path):
    """Each row a permutation of the 256 grey levels: a uniform histogram, so min-max and equalisation
    leave the exact image as it is and pass JPEG's error through unstretched, and every frequency
    present, so the error is not trivially small. Baseline JPEG rounds each coefficient of the
    orthonormal 8x8 DCT to a multiple of its quantiser q, an error of at most q/2; by Parseval a block's
    pixel error energy equals its coefficients', so the RMS pixel error is at most sqrt(mean(q^2) / 4).
    One grey level more covers the decoder's rounding to integers and the equalisation of the lossy
    image's slightly uneven histogram."""
    rng = np.random.default_rng(0)
    phantom = np.stack([rng.permutation(256) for _ in range(64)]).astype(np.uint8)
    quality = 90
    exact = write_dicom(phantom, tmp_path / "exact.dcm")
    lossy = write_dicom(phantom, tmp_path / "lossy.dcm", compression="jpeg-baseline", jpeg_quality=quality)
    assert np.array_equal(pixels(exact), phantom)
    encoded = io.BytesIO()
    Image.fromarray(phantom).save(encoded, format="JPEG", quality=quality)
    quantisers = np.array(Image.open(encoded).quantization[0], dtype=np.float64)
    bound = np.sqrt(np.mean(quantisers ** 2) / 4) + 1
    error = np.sqrt(np.mean((pixels(lossy).astype(np.float64) - phantom) ** 2))
    assert read_study_file(lossy).transfer_syntax == "JPEG Baseline (Process 1)"
    assert 0 < error <= bound


@pytest.mark.parametrize(("dates", "expected", "source"), [
    ({"study_date": "20260103", "acquisition_date": "20260102", "content_date": "20260101"}, date(2026, 1, 3),
     "StudyDate"),
    ({"acquisition_date": "20260102", "content_date": "20260101"}, date(2026, 1, 2), "AcquisitionDate"),
    ({"content_date": "20260101"}, date(2026, 1, 1), "ContentDate"),
    ({}, None, None),
])
def test_the_date_is_the_study_date_else_the_acquisition_date_else_the_content_date(radiograph, tmp_path, dates,
                                                                                    expected, source):
    study = read_study_file(write_dicom(radiograph, tmp_path / "dated.dcm", **dates))
    assert (study.date, study.date_source, study.warnings) == (expected, source, ())


@pytest.mark.parametrize("malformed", ["2026.03.10", "20261345"])
def test_a_malformed_study_date_falls_back_to_the_acquisition_date_and_says_so_without_quoting_it(
        radiograph, tmp_path, malformed):
    path = write_dicom(radiograph, tmp_path / "bad-date.dcm", study_date=malformed, acquisition_date="20260102")
    study = read_study_file(path)
    assert (study.date, study.date_source) == (date(2026, 1, 2), "AcquisitionDate")
    assert study.warnings == (
        f"{path}, field StudyDate: not a valid date (DICOM DA: YYYYMMDD); the date is taken from "
        "AcquisitionDate instead; correct StudyDate in the file, or give the date yourself",
    )
    assert malformed not in study.warnings[0]


def test_malformed_dates_with_nothing_to_fall_back_on_give_no_date_and_say_so(radiograph, tmp_path):
    study = read_study_file(write_dicom(radiograph, tmp_path / "bad.dcm", study_date="2026-01-01",
                                        content_date="yesterday"))
    assert (study.date, study.date_source) == (None, None)
    assert [warning.split(": ", 1)[0] for warning in study.warnings] == [
        f"{tmp_path / 'bad.dcm'}, field StudyDate", f"{tmp_path / 'bad.dcm'}, field ContentDate"]
    assert all("no other date tag holds one: no date" in warning for warning in study.warnings)


def test_a_dicom_file_without_an_extension_is_read_as_dicom(radiograph, tmp_path):
    named = write_dicom(radiograph, tmp_path / "named.dcm", study_date="20260101")
    bare = write_dicom(radiograph, tmp_path / "1.2.840.99999.1", study_date="20260101")
    assert is_dicom(bare) and bare.suffix != ".dcm"
    study = read_study_file(bare)
    assert (study.is_dicom, study.date) == (True, date(2026, 1, 1))
    assert np.array_equal(pixels(bare), pixels(named))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_jpeg_or_png_is_read_as_it_is_with_no_date(radiograph, tmp_path, suffix):
    path = tmp_path / f"study{suffix}"
    Image.fromarray(radiograph).save(path)
    study = read_study_file(path)
    assert not is_dicom(path)
    assert (study.is_dicom, study.date, study.date_source, study.patient_key, study.view) == (
        False, None, None, None, None)
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(study.image), np.asarray(image.convert("L")))


@pytest.mark.parametrize(("view", "lateral"), [("PA", False), ("AP", False), ("LL", True), ("LATERAL", True),
                                               ("lateral", True)])
def test_the_view_says_whether_the_image_is_lateral(radiograph, tmp_path, view, lateral):
    study = read_study_file(write_dicom(radiograph, tmp_path / "view.dcm", view=view))
    assert (study.view, study.is_lateral) == (view.upper(), lateral)


def test_the_patient_key_matches_files_of_one_patient_and_is_not_the_patient_id(radiograph, tmp_path):
    first = read_study_file(write_dicom(radiograph, tmp_path / "a.dcm", patient_id=PATIENT_ID))
    second = read_study_file(write_dicom(radiograph, tmp_path / "b.dcm", patient_id=PATIENT_ID))
    other = read_study_file(write_dicom(radiograph, tmp_path / "c.dcm", patient_id="PID-0002"))
    anonymous = read_study_file(write_dicom(radiograph, tmp_path / "d.dcm", patient_id=""))
    assert first.patient_key == second.patient_key != other.patient_key
    assert anonymous.patient_key is None
    assert PATIENT_ID not in first.patient_key and len(first.patient_key) == 32


def test_no_patient_name_id_or_date_appears_in_a_repr_a_warning_a_log_record_or_an_error(radiograph, tmp_path,
                                                                                         caplog):
    """Warnings and log records included: pydicom's and the reader's own, for a file with a malformed
    StudyDate and for two that are no radiograph."""
    malformed_date = "2026013"
    path = write_dicom(radiograph, tmp_path / "named.dcm", patient_id=PATIENT_ID, patient_name=PATIENT_NAME,
                       study_date=malformed_date)
    no_pixels = rewritten(path, tmp_path / "no-pixels.dcm", lambda dataset: dataset.pop("PixelData"))
    colour = rewritten(path, tmp_path / "colour.dcm",
                       lambda dataset: dataset.set_pixel_data(np.stack([radiograph] * 3, axis=-1), "RGB", 8))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = read_study_file(path)
        texts = [repr(study), str(study), *study.warnings]
        for bad in (no_pixels, colour):
            with pytest.raises(InputError) as error:
                read_study_file(bad)
            texts.append(str(error.value))
    texts += [str(warning.message) for warning in caught] + [record.getMessage() for record in caplog.records]
    assert study.warnings
    for text in texts:
        assert PATIENT_ID not in text and "Doe" not in text and "Jane" not in text, text
        assert malformed_date not in text, text


def test_a_malformed_value_reaches_no_warning_or_log_record_but_only_the_input_error(radiograph, tmp_path, caplog):
    """pydicom's value validation quotes a malformed IS, DS or UI value it reads in a warning and a log
    record; the reader switches it off, so the InputError, worded by the reader, is all that is said."""
    path = rewritten(write_dicom(radiograph, tmp_path / "good.dcm"), tmp_path / "bad.dcm",
                     malformed("NumberOfFrames", "IS", "2x"))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="field NumberOfFrames: not a whole number"):
            read_study_file(path)
    assert [str(warning.message) for warning in caught] == []
    assert [record.getMessage() for record in caplog.records if record.name.startswith("pydicom")] == []


def test_dicom_reads_in_threads_take_turns_and_leave_pydicom_validation_as_it_was(radiograph, tmp_path,
                                                                                  monkeypatch):
    """pydicom's value validation is one switch for the whole process, which each read turns off (so that
    no pydicom warning quotes the file) and then restores as it found it: two reads that overlapped could
    restore each other's "off" for good. Here each read waits (up to half a second) for all the others to
    be inside theirs at once; taking turns, none is."""
    paths = [write_dicom(radiograph, tmp_path / f"{index}.dcm") for index in range(3)]
    before = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    all_inside = threading.Barrier(len(paths))
    counting = threading.Lock()
    inside, most_inside, modes_inside = [0], [0], []
    read_dataset = dicom._read_dataset

    def read_dataset_waiting_for_the_others(path):
        with counting:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
        # Taking turns, the others never arrive: the barrier breaks after its timeout, as it should.
        with contextlib.suppress(threading.BrokenBarrierError):
            all_inside.wait(timeout=0.5)
        modes_inside.append(config.settings.reading_validation_mode)
        try:
            return read_dataset(path)
        finally:
            with counting:
                inside[0] -= 1

    monkeypatch.setattr(dicom, "_read_dataset", read_dataset_waiting_for_the_others)
    with ThreadPoolExecutor(len(paths)) as pool:
        studies = list(pool.map(read_study_file, paths))
    assert [study.path for study in studies] == paths
    assert most_inside == [1]
    assert modes_inside == [config.IGNORE] * len(paths)
    assert (config.settings.reading_validation_mode, config.settings.writing_validation_mode) == before


def _without_pixels(dataset):
    del dataset.PixelData


def _colour(dataset):
    dataset.set_pixel_data(np.zeros((8, 8, 3), dtype=np.uint8), "RGB", 8)


def _two_frames(dataset):
    dataset.set_pixel_data(np.stack([np.arange(64, dtype=np.uint8).reshape(8, 8)] * 2), "MONOCHROME2", 8)


def _mpeg2(dataset):
    dataset.PixelData = encapsulate([bytes(16)])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML


def _blank(dataset):
    dataset.set_pixel_data(np.full((8, 8), 7, dtype=np.uint8), "MONOCHROME2", 8)


@pytest.mark.parametrize(("change", "expected"), [
    (_without_pixels, "field PixelData: no pixel data: this DICOM (Modality CR) holds no image"),
    (_colour, "field PhotometricInterpretation: a colour image (RGB, 3 samples per pixel), not a chest X-ray "
              "radiograph"),
    (_two_frames, "field NumberOfFrames: 2 frames: a chest X-ray radiograph has one"),
    (_mpeg2, "field TransferSyntaxUID: pixel data in transfer syntax MPEG2 Main Profile / Main Level "
             "(1.2.840.10008.1.2.4.100), which pydicom cannot decode; convert it to an uncompressed DICOM"),
    (_blank, "field PixelData: every pixel has the value 7 after the rescale and window: a blank image"),
])
def test_a_dicom_that_is_no_chest_radiograph_is_an_input_error_naming_the_file_and_field(radiograph, tmp_path,
                                                                                         change, expected):
    path = rewritten(write_dicom(radiograph, tmp_path / "good.dcm"), tmp_path / "bad.dcm", change)
    with pytest.raises(InputError) as error:
        read_study_file(path)
    assert str(error.value).startswith(f"{path}, {expected}")
    assert error.value.fix


def malformed(keyword: str, vr: str, text: str):
    """A change that writes ``text`` as the value of ``keyword`` byte for byte, as a file from a faulty
    device has it (pydicom would refuse to write it from a value)."""
    def change(dataset):
        value = text.encode("ascii") + b" " * (len(text) % 2)
        dataset[Tag(keyword)] = RawDataElement(Tag(keyword), vr, len(value), value, 0, False, True)
    return change


@pytest.mark.parametrize(("change", "keyword", "expected"), [
    (malformed("WindowWidth", "DS", "0"), "WindowWidth", "a window 0 wide: a LINEAR window is at least 1 wide"),
    (malformed("WindowWidth", "DS", "abc"), "WindowWidth", "not a finite decimal number (DICOM DS)"),
    (malformed("WindowCenter", "DS", "abc"), "WindowCenter", "not a finite decimal number (DICOM DS)"),
    (malformed("VOILUTFunction", "CS", "CURVY"), "VOILUTFunction", "not a windowing function: expected one of "
                                                                   "LINEAR, LINEAR_EXACT, SIGMOID"),
    (malformed("NumberOfFrames", "IS", "x"), "NumberOfFrames", "not a whole number (DICOM IS)"),
    (malformed("RescaleSlope", "DS", "abc"), "RescaleSlope", "not a finite decimal number (DICOM DS)"),
    (malformed("RescaleIntercept", "DS", "nan"), "RescaleIntercept", "not a finite decimal number (DICOM DS)"),
])
def test_a_malformed_rescale_window_or_frame_count_is_an_input_error_naming_the_attribute(radiograph, tmp_path,
                                                                                          change, keyword, expected):
    good = write_dicom(radiograph, tmp_path / "good.dcm", bits_stored=12, window=(1500.0, 2000.0))
    path = rewritten(good, tmp_path / "bad.dcm", change)
    with pytest.raises(InputError) as error:
        read_study_file(path)
    assert str(error.value).startswith(f"{path}, field {keyword}: {expected}; ")
    assert (error.value.field, error.value.kind) == (keyword, f"field {keyword}")
    assert f"correct {keyword} in the file" in error.value.fix


def test_a_transfer_syntax_whose_decoder_is_not_installed_names_the_package_to_install(radiograph, tmp_path,
                                                                                       monkeypatch):
    path = write_dicom(radiograph, tmp_path / "j2k.dcm", compression="jpeg2000-lossless")
    # The decoders are installed here: their absence is what a person without pylibjpeg-openjpeg meets.
    monkeypatch.setattr(dicom, "get_decoder", lambda transfer_syntax: SimpleNamespace(is_available=False))
    with pytest.raises(InputError, match=r"field TransferSyntaxUID: pixel data in transfer syntax JPEG 2000 Image "
                                         r"Compression \(Lossless Only\) .*which no installed package decodes; "
                                         r"pip install pylibjpeg pylibjpeg-openjpeg$"):
        read_study_file(path)


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("gone.dcm", None, "not found: expected a chest X-ray as DICOM (.dcm or no extension), JPEG or PNG"),
    ("gone.png", None, "not found: expected a chest X-ray as DICOM (.dcm or no extension), JPEG or PNG"),
    ("notes.txt", b"the patient is fine\n", "neither a DICOM file (no 'DICM' marker at byte 128) nor an image"),
    ("notes.dcm", b"the patient is fine\n", "not a readable DICOM file (InvalidDicomError"),
])
def test_a_missing_file_or_one_that_is_no_image_is_an_input_error_naming_it(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_study_file(path)
    assert str(error.value).startswith(f"{path}: {expected}")


def test_the_datamodule_reads_a_dicom_sample_through_the_dicom_pipeline(radiograph, tmp_path):
    current = write_dicom(radiograph, tmp_path / "current", study_date="20260101", photometric="MONOCHROME1",
                          bits_stored=12)
    prior = tmp_path / "prior.jpg"
    Image.fromarray(radiograph).save(prior)
    sample = Sample("own-1", "difference", "difference", "what has changed?", "nothing has changed.",
                    image=current, prior_image=prior, interval_days=30.0)
    loaded = SampleDataset([sample])[0]
    assert np.array_equal(np.asarray(loaded.image), pixels(current))
    with Image.open(prior) as image:
        assert np.array_equal(np.asarray(loaded.prior_image), np.asarray(image.convert("L")))


def test_the_datamodule_names_the_sample_and_field_of_a_bad_dicom(radiograph, tmp_path):
    bad = rewritten(write_dicom(radiograph, tmp_path / "good.dcm"), tmp_path / "bad.dcm", _without_pixels)
    sample = Sample("own-2", "diagnostic", "view", "which view is this image taken?", "PA view", image=bad)
    with pytest.raises(InputError, match=r"field PixelData: no pixel data: .* \(image of sample own-2\); export"):
        SampleDataset([sample])[0]


def test_the_command_writes_a_dicom_and_prints_no_patient_identifier(world, tmp_path, capsys):
    image = sorted((world / "mimic-cxr-jpg" / "files").rglob("*.jpg"))[0]
    out = tmp_path / "study"
    main([str(image), str(out), "--study-date", "20260101", "--view", "AP", "--patient-id", PATIENT_ID,
          "--patient-name", PATIENT_NAME, "--bits", "12", "--window", "2048", "4096",
          "--compression", "jpeg2000-lossless"])
    printed = capsys.readouterr().out
    assert printed == f"wrote {out}: StudyDate 20260101, view AP, JPEG 2000 Image Compression (Lossless Only)\n"
    study = read_study_file(out)
    assert (study.date, study.view, study.bits_stored) == (date(2026, 1, 1), "AP", 12)
