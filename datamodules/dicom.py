"""A chest X-ray file (DICOM, JPEG or PNG) read into what the model and the prompt need: an 8-bit
grayscale image, the study date and where it came from, the view, and a key that tells whether two
files are of one patient without holding the patient's identifier.

A JPEG or PNG is taken as it is (``Image.open(path).convert("L")``): it is assumed to be processed
already, as MIMIC-CXR-JPG's images are. A DICOM file's pixels go through the steps by which
MIMIC-CXR-JPG made its JPEGs from MIMIC-CXR's DICOM files, so that our MIMIC-CXR-JPG-trained models see
a DICOM as they saw their training images. Those steps are described in the Methods ("Chest
radiographs") of MIMIC-CXR-JPG's PhysioNet page (https://physionet.org/content/mimic-cxr-jpg/2.1.0/;
Johnson et al., arXiv:1901.07042): pixels extracted with pydicom, "normalized to the range [0, 255] by
subtracting the lowest value in the image, dividing by the highest value in the shifted image,
truncating values, and converting the result to an unsigned integer", inverted according to
PhotometricInterpretation, histogram-equalised with OpenCV, and written by OpenCV as JPEG at quality 95.
Here:

1. the stored pixel array, decoded (pydicom, with the pylibjpeg plugins for JPEG, JPEG-LS and
   JPEG 2000 transfer syntaxes);
2. the Modality LUT: RescaleSlope and RescaleIntercept, or a ModalityLUTSequence. MIMIC-CXR-JPG
   lists no such step; without a window, a rescale with a positive slope changes nothing after
   step 4's min-max;
3. the VOI LUT (pydicom's ``apply_voi``), or the first window (WindowCenter/WindowWidth, by
   VOILUTFunction) when there are several, where the file has one: the display the acquiring site chose.
   MIMIC-CXR-JPG lists no such step; we take it because a file from another site may store far more
   range than the radiograph uses (a 16-bit container for 12 bits of signal, collimator edges), which
   min-max alone would keep and the window removes;
4. min-max scaling of the values to [0, 255], rounded to the nearest level (MIMIC-CXR-JPG's text says
   "truncating"; the two differ by at most one level before equalisation);
5. inversion when PhotometricInterpretation is MONOCHROME1 (its lowest value is white), or when
   PresentationLUTShape is INVERSE, so that bone is always bright as in MONOCHROME2. The standard
   pairs INVERSE with MONOCHROME1 to say the same thing (PS3.3 C.7.6.1, General Image Module), so
   the two together invert once, not twice;
6. histogram equalisation exactly as OpenCV's ``cv::equalizeHist`` (``equalize_histogram``);
7. an 8-bit "L" image. MIMIC-CXR-JPG then wrote JPEGs at quality 95; we keep the pixels lossless.

The model's own preprocessing (resizing, normalisation) happens afterwards, in the collator.

Nothing identifying leaves this module: the PatientID becomes ``patient_key``, a keyed BLAKE2b hash
whose key is drawn anew in every process, so two files can be compared for the same patient while the
key cannot be traced back to the identifier or linked across runs. Names, IDs and birth dates appear
in no field, repr, log line or error message; the study's date only as ``StudyFile.date``, never a
malformed date's text in a warning.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom import config, uid
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from common.readers import InputError

DATE_TAGS = ("StudyDate", "AcquisitionDate", "ContentDate")  # in the order a study's date is taken
LATERAL_VIEWS = frozenset({"LATERAL", "LAT", "LL", "RL", "XTABLE LATERAL"})
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# The VOILUTFunction values a window is applied by, each with the narrowest WindowWidth it takes
# (PS3.3 C.11.2.1.2.1 and C.11.2.1.3): LINEAR subtracts 1 from the width, the others divide by it.
WINDOW_FUNCTIONS = {"LINEAR": "at least 1", "LINEAR_EXACT": "above 0", "SIGMOID": "above 0"}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})  # read without looking for a DICOM marker
EXPECTED = "a chest X-ray as DICOM (.dcm or no extension), JPEG or PNG"
# The PyPI packages through which pydicom decodes each compressed transfer syntax.
ALL_DECODERS = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
DECODERS = {
    **dict.fromkeys((uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                     uid.JPEGLSLossless, uid.JPEGLSNearLossless), "pylibjpeg pylibjpeg-libjpeg"),
    **dict.fromkeys((uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K),
                    "pylibjpeg pylibjpeg-openjpeg"),
}
# Drawn once per process: the same PatientID gives the same key within a run, and a key means nothing
# outside it.
_PATIENT_KEY_SECRET = secrets.token_bytes(32)
# pydicom's value validation is one switch for the whole process: reads that switch it off take turns.
_VALIDATION_SWITCH = threading.Lock()


@dataclass(frozen=True)
class StudyFile:
    """One chest X-ray file, read. ``date`` is the first valid one of ``DATE_TAGS`` (``date_source``
    names it); both are None for a JPEG or PNG. ``view`` is ViewPosition as written (upper case).
    ``warnings`` are problems read past (a malformed date that another tag replaced), each worded as
    an ``InputError``. The repr shows no ``patient_key`` and no pixels."""

    path: Path
    image: Image.Image | None  # None once dropped: a manifest keeps what it checks, not every image's pixels
    date: date | None = None
    date_source: str | None = None
    patient_key: str | None = None
    view: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    bits_stored: int | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def is_dicom(self) -> bool:
        return self.transfer_syntax is not None

    @property
    def is_lateral(self) -> bool:
        return self.view in LATERAL_VIEWS

    def __repr__(self) -> str:
        size = f"{self.image.width}x{self.image.height}" if self.image is not None else None
        details = [f"path={str(self.path)!r}", f"size={size}",
                   f"date={self.date.isoformat() if self.date else None}", f"date_source={self.date_source}",
                   f"view={self.view}"]
        if self.is_dicom:
            details += [f"photometric={self.photometric}", f"transfer_syntax={self.transfer_syntax!r}",
                        f"bits_stored={self.bits_stored}"]
        return f"StudyFile({', '.join(details)})"


def is_dicom(path: str | Path) -> bool:
    """A DICOM file by its 'DICM' marker after the 128-byte preamble (files from an archive often have
    no extension), or by a ``.dcm`` name."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_study_file(path: str | Path) -> StudyFile:
    """The file at ``path`` read as a chest X-ray (see the module docstring); every problem is an
    ``InputError`` naming the file, the attribute and what to do."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"not found: expected {EXPECTED}", fix="check the path")
    if is_dicom(path):
        return _read_dicom(path)
    try:
        with Image.open(path) as image:
            return StudyFile(path, image.convert("L"))
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(path, f"neither a DICOM file (no 'DICM' marker at byte 128) nor an image ({error})",
                         fix=f"give {EXPECTED}") from None


def _read_dicom(path: Path) -> StudyFile:
    # pydicom's value validation warns of a malformed value by quoting it (pydicom 3.0 on reading: IS, DS
    # and UI values; names, IDs and dates it does not quote), and predict.py and the demo show warnings:
    # nothing read from the file is to reach them but through an InputError worded here. The switch is
    # one for the whole process and restores what it found on leaving, so two reads in threads (the
    # demo's) that overlapped could leave it off for good, or on in the middle of a read: they take turns.
    with _VALIDATION_SWITCH, config.disable_value_validation():
        return _read_dataset(path)


def _read_dataset(path: Path) -> StudyFile:
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise InputError(path, f"not a readable DICOM file ({type(error).__name__}: {error})",
                         fix=f"give {EXPECTED}; a DICOM file without its 128-byte preamble can be rewritten "
                             "with `dcmconv` (DCMTK) or `gdcmconv` (GDCM)") from None
    _check_radiograph(path, dataset)
    transfer_syntax = uid.UID(dataset.file_meta.get("TransferSyntaxUID", uid.ImplicitVRLittleEndian))
    warnings: list[str] = []
    found_date, date_source = _study_date(path, dataset, warnings)
    patient_id = str(dataset.get("PatientID", "") or "").strip()
    bits_stored = dataset.get("BitsStored")
    return StudyFile(
        path, _pixels(path, dataset, transfer_syntax), date=found_date, date_source=date_source,
        patient_key=_patient_key(patient_id) if patient_id else None,
        view=str(dataset.get("ViewPosition", "") or "").strip().upper() or None,
        photometric=dataset.PhotometricInterpretation, transfer_syntax=transfer_syntax.name,
        bits_stored=int(bits_stored) if bits_stored is not None else None, warnings=tuple(warnings),
    )


def _check_radiograph(path: Path, dataset: pydicom.Dataset) -> None:
    """A single grayscale frame with pixels: a projection radiograph, not a report, a series or a screenshot."""
    if "PixelData" not in dataset and "Modality" not in dataset and "SOPClassUID" not in dataset:
        raise InputError(path, "not a readable DICOM file: no pixel data, Modality or SOPClassUID could be read from "
                               "it (a truncated or corrupt file)", field="PixelData",
                         fix="copy or export the file again from the archive")
    if "PixelData" not in dataset:
        modality = dataset.get("Modality", "unknown")
        raise InputError(path, f"no pixel data: this DICOM (Modality {modality}) holds no image, as a structured "
                               "report, a presentation state or a key object does", field="PixelData",
                         fix="export the radiograph itself (Modality CR or DX) from the archive")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    samples = int(dataset.get("SamplesPerPixel", 1))
    if photometric not in MONOCHROME or samples != 1:
        raise InputError(path, f"a colour image ({photometric or 'no photometric interpretation'}, "
                               f"{samples} samples per pixel), not a chest X-ray radiograph, which is "
                               f"{' or '.join(MONOCHROME)}", field="PhotometricInterpretation",
                         fix="export the original radiograph (Modality CR or DX), not a screen capture "
                             "or a secondary capture of it")
    frames = _number(path, dataset, "NumberOfFrames", 1.0, whole=True) or 1
    if frames != 1:
        raise InputError(path, f"{frames:g} frames: a chest X-ray radiograph has one (this looks like a "
                               "fluoroscopy or a multi-frame series)", field="NumberOfFrames",
                         fix="export the single radiograph of the study as its own DICOM file")


def _study_date(path: Path, dataset: pydicom.Dataset, warnings: list[str]) -> tuple[date | None, str | None]:
    """The first of ``DATE_TAGS`` that holds a valid date, and its tag; each malformed one before it is
    recorded in ``warnings``, saying which tag the date came from instead."""
    found, malformed = (None, None), []
    for tag in DATE_TAGS:
        value = str(dataset.get(tag, "") or "").strip()
        if not value:
            continue
        try:
            found = (_date(value), tag)
            break
        except ValueError:
            malformed.append(tag)
    instead = f"the date is taken from {found[1]} instead" if found[1] else "no other date tag holds one: no date"
    # The malformed value is not quoted: it is still a patient's date.
    for tag in malformed:
        warnings.append(str(InputError(path, f"not a valid date (DICOM DA: YYYYMMDD); {instead}", field=tag,
                                       fix=f"correct {tag} in the file, or give the date yourself")))
    return found


def _date(value: str) -> date:
    """A DA value, ``YYYYMMDD``: eight digits exactly (``strptime`` would take '2026013' as 3 January)."""
    if not (len(value) == 8 and value.isascii() and value.isdigit()):
        raise ValueError(value)
    return date(int(value[:4]), int(value[4:6]), int(value[6:]))


def _patient_key(patient_id: str) -> str:
    return hashlib.blake2b(patient_id.encode("utf-8"), key=_PATIENT_KEY_SECRET, digest_size=16).hexdigest()


def _pixels(path: Path, dataset: pydicom.Dataset, transfer_syntax: uid.UID) -> Image.Image:
    """Steps 1-7 of the module docstring."""
    stored = _decoded(path, dataset, transfer_syntax)
    values = _voi_lut(path, dataset, _modality_lut(path, dataset, stored)).astype(np.float64)
    low, high = values.min(), values.max()
    if high == low:
        raise InputError(path, f"every pixel has the value {low:g} after the rescale and window: a blank image",
                         field="PixelData", fix="check that the file holds the radiograph, and its WindowWidth")
    inverted = (dataset.PhotometricInterpretation == "MONOCHROME1"
                or str(dataset.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE")
    # Scaled as (high - v) when inverted rather than 255 minus the scaled value: the same radiograph
    # stored either way then gives the same bytes, not values a rounding apart.
    offsets = high - values if inverted else values - low
    scaled = np.rint(offsets * (255.0 / (high - low))).astype(np.uint8)
    return Image.fromarray(equalize_histogram(scaled), mode="L")


def equalize_histogram(grey: np.ndarray) -> np.ndarray:
    """OpenCV's ``cv::equalizeHist`` (imgproc/src/histogram.cpp) for an 8-bit array, level for level:
    the lowest level present goes to 0, and each level to 255 times the count of pixels at or below it
    less the lowest level's count, over the count of pixels above the lowest level, rounded to nearest.
    An image of one level is returned as it is. (Pillow's ``ImageOps.equalize`` is not this: it maps a
    level by the count below it and leaves the top level's count out, tens of levels apart where a black
    border or saturated pixels hold many of the pixels.)"""
    histogram = np.bincount(grey.ravel(), minlength=256)
    lowest = int(np.flatnonzero(histogram)[0])
    if histogram[lowest] == grey.size:
        return grey.copy()
    # In single precision, as OpenCV: scale = 255.f / (total - lowest count); lut = cvRound(count * scale).
    # Levels below the lowest come out negative and are clipped; no pixel has them.
    scale = np.float32(255) / np.float32(grey.size - histogram[lowest])
    counts_above_lowest = (np.cumsum(histogram) - histogram[lowest]).astype(np.float32)
    lookup = np.clip(np.rint(counts_above_lowest * scale), 0, 255).astype(np.uint8)
    return lookup[grey]


def _modality_lut(path: Path, dataset: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Step 2: the stored values through the ModalityLUTSequence where the file has one, else through
    RescaleSlope and RescaleIntercept (1 and 0 where absent)."""
    slope = _number(path, dataset, "RescaleSlope", 1.0)
    intercept = _number(path, dataset, "RescaleIntercept", 0.0)
    if not dataset.get("ModalityLUTSequence"):
        return stored * slope + intercept
    try:
        return apply_modality_lut(stored, dataset)
    except Exception as error:  # a LUT sequence can be damaged in many ways, each its own exception
        raise InputError(path, f"the Modality LUT cannot be applied ({type(error).__name__}: {error})",
                         field="ModalityLUTSequence", fix="export the radiograph again from the archive") from None


def _voi_lut(path: Path, dataset: pydicom.Dataset, values: np.ndarray) -> np.ndarray:
    """Step 3: the values through the first VOI LUT where the file has a complete one, else through its
    first window where it has one, else as they are (pydicom's ``apply_voi_lut`` chooses alike)."""
    lut = dataset.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        try:
            return apply_voi(values, dataset, index=0)
        except Exception as error:  # a LUT sequence can be damaged in many ways, each its own exception
            raise InputError(path, f"the VOI LUT cannot be applied ({type(error).__name__}: {error})",
                             field="VOILUTSequence", fix="export the radiograph again from the archive") from None
    center = _number(path, dataset, "WindowCenter", None)
    width = _number(path, dataset, "WindowWidth", None)
    if center is None or width is None:
        return values
    function = str(dataset.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        raise InputError(path, f"not a windowing function: expected one of {', '.join(WINDOW_FUNCTIONS)}",
                         field="VOILUTFunction", fix="correct VOILUTFunction in the file (LINEAR, if unsure)")
    if (width < 1) if function == "LINEAR" else (width <= 0):
        raise InputError(path, f"a window {width:g} wide: a {function} window is {WINDOW_FUNCTIONS[function]} wide",
                         field="WindowWidth", fix="correct WindowWidth in the file, or remove WindowCenter and "
                                                  "WindowWidth to read the radiograph without a window")
    return _window(values, center, width, function)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """``values`` through a window, to [0, 1] rather than to the file's output range, which step 4's
    min-max makes immaterial: PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1
    (SIGMOID). Written here rather than taken from pydicom's ``apply_windowing``, which reads the window,
    the rescale and the bit depth from the file again, unchecked, only to compute that range."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows far below the centre: the value is then 0
            return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR":  # the standard's window is half a value lower and one narrower than it reads
        center, width = center - 0.5, width - 1
    if width == 0:  # a LINEAR window 1 wide: a threshold
        return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0, 1)


def _number(path: Path, dataset: pydicom.Dataset, keyword: str, default: float | None,
            whole: bool = False) -> float | None:
    """The first value of the decimal (DS) or, with ``whole``, integer (IS) attribute ``keyword``;
    ``default`` where the file leaves it out or empty. Anything else is an ``InputError`` naming it, not
    quoting it (pydicom, its validation off, hands a malformed value over as the text it read)."""
    value = dataset.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and (number.is_integer() or not whole):
        return number
    expected = "a whole number (DICOM IS)" if whole else "a finite decimal number (DICOM DS)"
    raise InputError(path, f"not {expected}", field=keyword,
                     fix=f"correct {keyword} in the file, or export the radiograph again from the archive")


def _decoded(path: Path, dataset: pydicom.Dataset, transfer_syntax: uid.UID) -> np.ndarray:
    """The stored pixel values (Rows, Columns); a transfer syntax nothing here decodes names the package that would."""
    if transfer_syntax.is_compressed:
        try:
            decoder = get_decoder(transfer_syntax)
        except NotImplementedError:
            raise InputError(path, f"pixel data in transfer syntax {transfer_syntax.name} ({transfer_syntax}), "
                                   "which pydicom cannot decode", field="TransferSyntaxUID",
                             fix="convert it to an uncompressed DICOM, e.g. `gdcmconv --raw IN OUT` (GDCM) or "
                                 "`dcmdjpeg IN OUT` (DCMTK)") from None
        if not decoder.is_available:
            raise InputError(path, f"pixel data in transfer syntax {transfer_syntax.name} ({transfer_syntax}), "
                                   "which no installed package decodes", field="TransferSyntaxUID",
                             fix=f"pip install {DECODERS.get(transfer_syntax, ALL_DECODERS)}") from None
    try:
        return dataset.pixel_array
    except Exception as error:  # the decoders raise many types for damaged pixel data
        raise InputError(path, f"the pixel data cannot be decoded ({type(error).__name__}: {error})",
                         field="PixelData", fix="export the radiograph again from the archive") from None
