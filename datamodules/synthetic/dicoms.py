"""A grayscale image written as a chest X-ray DICOM file (Computed Radiography Image Storage), in the
forms real scanners and archives produce: MONOCHROME1 or MONOCHROME2, with or without an INVERSE
PresentationLUTShape, 8, 12 or 16 stored bits with a rescale and a window, uncompressed or
JPEG-compressed. Tests read these back through ``datamodules.dicom``, and a person can try
``predict.py`` on the synthetic world's images as DICOM::

    python -m datamodules.synthetic.dicoms IMAGE.jpg OUT.dcm --study-date 20260101 --view PA \\
        --bits 12 --rescale 1 -1024 --window 1024 4096 --compression jpeg2000-lossless

Every identifier written (patient name and id, UIDs) is synthetic.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

# The transfer syntaxes written, by the name the command line takes.
COMPRESSIONS = {"none": ExplicitVRLittleEndian, "jpeg2000-lossless": JPEG2000Lossless,
                "jpeg-baseline": JPEGBaseline8Bit}
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
PRESENTATION_LUT_SHAPES = ("IDENTITY", "INVERSE")
BITS_STORED = (8, 12, 16)


def write_dicom(image: Image.Image | np.ndarray, path: str | Path, *, study_date: str | None = None,
                acquisition_date: str | None = None, content_date: str | None = None,
                patient_id: str = "SYNTH-0001", patient_name: str = "Synthetic^Patient", view: str = "PA",
                photometric: str = "MONOCHROME2", presentation_lut_shape: str | None = None, bits_stored: int = 8,
                rescale: tuple[float, float] = (1.0, 0.0), window: tuple[float, float] | None = None,
                compression: str = "none", jpeg_quality: int = 90) -> Path:
    """Writes ``image`` (8-bit grayscale; black is no attenuation) as a DICOM file at ``path`` (any name:
    ``.dcm`` or none) and returns the path.

    Dates are DA values written as given (``YYYYMMDD``; anything else is written too, to test readers);
    ``None`` leaves StudyDate empty (it is type 2) and the other two out. The 8-bit grey levels are
    scaled to ``bits_stored`` bits (``round(g * (2**bits - 1) / 255)``). A file shown inverted (MONOCHROME1,
    or ``presentation_lut_shape`` INVERSE, written as PresentationLUTShape; None leaves it out) stores the
    inverted values, so every form shows the same radiograph. ``rescale`` is (RescaleSlope,
    RescaleIntercept); ``window`` is (WindowCenter, WindowWidth) in the rescaled values of the
    uninverted image, mirrored for an inverted one so both files display alike. ``jpeg-baseline`` takes
    8 bits only (the standard's baseline process is 8-bit) and is lossy at ``jpeg_quality``.
    """
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric={photometric!r}: expected one of {PHOTOMETRICS}")
    if presentation_lut_shape not in (None, *PRESENTATION_LUT_SHAPES):
        raise ValueError(f"presentation_lut_shape={presentation_lut_shape!r}: expected None or one of "
                         f"{PRESENTATION_LUT_SHAPES}")
    if bits_stored not in BITS_STORED:
        raise ValueError(f"bits_stored={bits_stored}: expected one of {BITS_STORED}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: expected one of {sorted(COMPRESSIONS)}")
    if compression == "jpeg-baseline" and bits_stored != 8:
        raise ValueError(f"compression='jpeg-baseline' stores 8 bits, not bits_stored={bits_stored}")
    grey = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"expected an 8-bit grayscale image, got an array of {grey.dtype} and shape {grey.shape}")
    largest = 2 ** bits_stored - 1
    stored = np.rint(grey.astype(np.float64) * largest / 255).astype(np.uint8 if bits_stored == 8 else np.uint16)
    slope, intercept = rescale
    if photometric == "MONOCHROME1" or presentation_lut_shape == "INVERSE":
        stored = largest - stored
        if window is not None:
            # A stored s rescales to m = slope*s + intercept, its inverse to slope*largest + 2*intercept - m.
            # DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) shows m at ((m - (c - 0.5)) / (w - 1) + 0.5) of
            # the range, clipped; the inverse shows at 1 minus that, boundaries included, exactly when its
            # centre is slope*largest + 2*intercept - c + 1.
            window = (slope * largest + 2 * intercept - window[0] + 1, window[1])

    # Malformed dates are written on purpose (to test readers): pydicom is not to warn of them.
    with config.disable_value_validation():
        dataset = _radiograph(patient_id, patient_name, view, study_date, acquisition_date, content_date)
    dataset.set_pixel_data(stored, photometric, bits_stored)
    if presentation_lut_shape is not None:
        dataset.PresentationLUTShape = presentation_lut_shape
    dataset.RescaleSlope, dataset.RescaleIntercept, dataset.RescaleType = slope, intercept, "US"
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if compression == "jpeg2000-lossless":
        dataset.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif compression == "jpeg-baseline":
        _compress_jpeg_baseline(dataset, stored, jpeg_quality)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _radiograph(patient_id: str, patient_name: str, view: str, study_date: str | None,
                acquisition_date: str | None, content_date: str | None) -> Dataset:
    """The attributes of a CR image of the chest, without its pixels: patient, study, series, image."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset.SOPClassUID, dataset.SOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientName, dataset.PatientID = patient_name, patient_id
    # Type 2 attributes: present, and empty where a synthetic patient has no value.
    dataset.PatientBirthDate, dataset.PatientSex = "", ""
    dataset.StudyDate, dataset.StudyTime = study_date or "", ""
    dataset.ReferringPhysicianName, dataset.StudyID, dataset.AccessionNumber = "", "", ""
    if acquisition_date is not None:
        dataset.AcquisitionDate = acquisition_date
    if content_date is not None:
        dataset.ContentDate = content_date
    dataset.Modality, dataset.SeriesNumber, dataset.InstanceNumber = "CR", 1, 1
    dataset.BodyPartExamined, dataset.ViewPosition = "CHEST", view
    dataset.ImageType = ["ORIGINAL", "PRIMARY"]
    dataset.PatientOrientation = ""
    return dataset


def _compress_jpeg_baseline(dataset: Dataset, stored: np.ndarray, quality: int) -> None:
    """Encodes the pixels with Pillow's baseline JPEG encoder and encapsulates the one frame (pydicom
    has no encoder of its own for this transfer syntax)."""
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=quality)
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionMethod = "ISO_10918_1"
    dataset.LossyImageCompressionRatio = f"{stored.nbytes / len(buffer.getvalue()):.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datamodules.synthetic.dicoms",
                                     description=__doc__.split(". ", 1)[0].replace("\n", " ") + ".")
    parser.add_argument("image", type=Path, help="a grayscale image (JPEG or PNG), e.g. one of the synthetic world's")
    parser.add_argument("out", type=Path, help="the DICOM file to write (.dcm, or no extension)")
    parser.add_argument("--study-date", help="StudyDate, YYYYMMDD (default: empty)")
    parser.add_argument("--acquisition-date", help="AcquisitionDate, YYYYMMDD (default: none)")
    parser.add_argument("--content-date", help="ContentDate, YYYYMMDD (default: none)")
    parser.add_argument("--view", default="PA", help="ViewPosition: PA, AP, LL, LATERAL, ... (default: PA)")
    parser.add_argument("--patient-id", default="SYNTH-0001", help="a synthetic PatientID (default: SYNTH-0001)")
    parser.add_argument("--patient-name", default="Synthetic^Patient", help="a synthetic PatientName")
    parser.add_argument("--photometric", choices=PHOTOMETRICS, default="MONOCHROME2")
    parser.add_argument("--bits", type=int, choices=BITS_STORED, default=8, help="BitsStored (default: 8)")
    parser.add_argument("--rescale", type=float, nargs=2, metavar=("SLOPE", "INTERCEPT"), default=(1.0, 0.0))
    parser.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                        help="WindowCenter and WindowWidth, in rescaled values (default: none)")
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default="none")
    args = parser.parse_args(argv)
    with Image.open(args.image) as image:
        path = write_dicom(image, args.out, study_date=args.study_date, acquisition_date=args.acquisition_date,
                           content_date=args.content_date, patient_id=args.patient_id,
                           patient_name=args.patient_name, view=args.view, photometric=args.photometric,
                           bits_stored=args.bits, rescale=tuple(args.rescale),
                           window=tuple(args.window) if args.window else None, compression=args.compression)
    dates = ", ".join(f"{tag} {value}" for tag, value in (("StudyDate", args.study_date),
                      ("AcquisitionDate", args.acquisition_date), ("ContentDate", args.content_date)) if value)
    print(f"wrote {path}: {dates or 'no date'}, view {args.view}, {COMPRESSIONS[args.compression].name}")


if __name__ == "__main__":
    main()
