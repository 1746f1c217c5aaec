"""A simulated longitudinal chest X-ray population, written in the real MIMIC-CXR-JPG and
Medical-Diff-VQA v1.0.1 formats so that the same loaders serve real and synthetic data.

Each subject has 2-6 dated studies. Every finding site (a side, a lung zone, a device) follows a
continuous-time Markov chain over levels with rates per day, so the state at the next study
depends on the interval. Images, reports, CheXpert labels and Medical-Diff-VQA questions are all
drawn from these states; ``truth/studies.csv`` keeps the states for builders that need ground truth.

    python -m datamodules.synthetic --out DIR --subjects 125 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.linalg import expm
from scipy.ndimage import gaussian_filter

GENERATOR = "lumen.datamodules.synthetic"
GENERATOR_VERSION = "1.0"


@dataclass(frozen=True)
class Finding:
    """A finding, where it can sit, and how each of its sites evolves (rates per day).

    A site's level is 0 (absent) up to ``len(levels)`` (or 1 for a finding without levels).
    """

    name: str  # the Medical-Diff-VQA official name
    sites: tuple[str, ...]
    levels: tuple[str, ...] = ()
    kind: str | None = None  # the answer to "what type is the xxx?"
    appear: float = 0.0  # absent -> lowest level
    resolve: float = 0.0  # any level -> absent
    progress: float = 0.0  # one level up
    regress: float = 0.0  # one level down, never to absent (that is `resolve`)

    @property
    def top_level(self) -> int:
        return max(len(self.levels), 1)

    def level_name(self, level: int) -> str:
        return self.levels[level - 1]


ZONES = ("left upper", "left lower", "right upper", "right lower")
OTHER_SIDE = {"left": "right", "right": "left"}
# Medical-Diff-VQA's official order (disease_lib.csv): finding lists in answers follow it.
# Rates: every chain mixes within weeks, so a finding seen now is about as often new as persisting
# over the intervals drawn below, and short intervals still change now and then.
FINDINGS = (
    Finding("pleural effusion", ("left", "right"), ("small", "moderate", "large"), "layering",
            appear=0.006, resolve=0.03, progress=0.12, regress=0.12),
    Finding("atelectasis", ("left", "right"), (), "plate-like", appear=0.007, resolve=0.035),
    Finding("cardiomegaly", ("",), ("mild", "moderate", "severe"), None,
            appear=0.012, resolve=0.03, progress=0.12, regress=0.12),
    Finding("pneumothorax", ("left", "right"), ("small", "moderate", "large"), None,
            appear=0.003, resolve=0.04, progress=0.12, regress=0.12),
    Finding("lung opacity", ZONES, (), "patchy", appear=0.004, resolve=0.04),
    Finding("consolidation", ZONES, (), "dense", appear=0.003, resolve=0.04),
)
# A CheXpert label and report content, not a Medical-Diff-VQA finding.
DEVICES = Finding("support devices", ("central line", "endotracheal tube"), (), None, appear=0.006, resolve=0.05)
FINDING_BY_NAME = {finding.name: finding for finding in FINDINGS}
SITES = tuple((finding, site) for finding in (*FINDINGS, DEVICES) for site in finding.sites)
SITE_INDEX = {key: index for index, key in enumerate(SITES)}


def site_column(finding: Finding, site: str) -> str:
    """The ``truth/studies.csv`` column of one site, e.g. ``pleural_effusion_left``."""
    return "_".join(part.replace(" ", "_") for part in (finding.name, site) if part)


SITE_COLUMNS = tuple(site_column(finding, site) for finding, site in SITES)
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
VIEW_MEANINGS = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}
PAIR_COLUMNS = ["study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"]
DIFFVQA_SPLITS = {"train": "train", "validate": "val", "test": "test"}
GZIP = {"method": "gzip", "mtime": 0}  # mtime 0: same seed, same bytes


# ----------------------------------------------------------------------------- the population


@dataclass(frozen=True)
class ImageRecord:
    """One image of a study, as a row of the MIMIC metadata table."""

    dicom_id: str
    view: str  # PA, AP or LATERAL
    rows: int
    columns: int


@dataclass(frozen=True)
class Study:
    """One study: when, which frontal view, the true level of every site, and its images."""

    subject_id: int
    study_id: int
    date: date
    time: float  # StudyTime, HHMMSS.fff as a float
    view: str  # the frontal view, PA or AP
    levels: tuple[int, ...]  # one level per entry of SITES
    images: tuple[ImageRecord, ...]  # the frontal image first
    split: str  # MIMIC's: train, validate, test

    @property
    def study_date(self) -> int:
        return int(self.date.strftime("%Y%m%d"))

    def level(self, finding: Finding, site: str) -> int:
        return self.levels[SITE_INDEX[finding, site]]

    @cached_property
    def findings(self) -> dict[Finding, tuple[int, tuple[str, ...]]]:
        """Present Medical-Diff-VQA findings -> (highest level over sites, sites present), in official order."""
        present = {}
        for finding in FINDINGS:
            sites = tuple(site for site in finding.sites if self.level(finding, site))
            if sites:
                present[finding] = (max(self.level(finding, site) for site in sites), sites)
        return present


def _rate_matrix(finding: Finding) -> np.ndarray:
    states = finding.top_level + 1
    rates = np.zeros((states, states))
    rates[0, 1] = finding.appear
    for level in range(1, states):
        rates[level, 0] = finding.resolve
        if level + 1 < states:
            rates[level, level + 1] = finding.progress
        if level > 1:
            rates[level, level - 1] = finding.regress
    np.fill_diagonal(rates, -rates.sum(axis=1))
    return rates


@lru_cache(maxsize=None)
def _one_day(finding: Finding) -> np.ndarray:
    return expm(_rate_matrix(finding))


@lru_cache(maxsize=None)
def transition(finding: Finding, days: int) -> np.ndarray:
    """P[a, b]: probability that a site at level a is at level b ``days`` later."""
    # A power of the one-day matrix: exact for whole days, and far cheaper than expm per interval.
    probabilities = np.clip(np.linalg.matrix_power(_one_day(finding), days), 0, None)  # rounding can dip below 0
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def _unique_ids(rng: np.random.Generator, count: int, low: int, high: int) -> list[int]:
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < count:
        for value in rng.integers(low, high, size=count - len(ids)).tolist():
            if value not in seen:
                seen.add(value)
                ids.append(value)
    return ids


def _dicom_ids(rng: np.random.Generator, count: int) -> list[str]:
    # 160 random bits each: a collision is out of the question at any world size.
    words = rng.integers(0, 2**32, size=(count, 5), dtype=np.uint64)
    return ["-".join(f"{int(word):08x}" for word in row) for row in words]


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    rows = int(rng.integers(240, 321))
    # Aspect within 0.85-1.15, so a centre square crop keeps the corner markers.
    columns = int(np.clip(round(rows * rng.uniform(0.85, 1.15)), 224, 320))
    return rows, columns


def simulate_population(subjects: int, seed: int) -> list[Study]:
    """All studies, ordered by subject then date."""
    if subjects < 1:
        raise ValueError(f"subjects must be at least 1, got {subjects}")
    rng = np.random.default_rng([seed, 0])
    subject_ids = sorted(_unique_ids(rng, subjects, 10_000_000, 20_000_000))
    study_counts = rng.integers(2, 7, size=subjects)
    study_ids = iter(_unique_ids(rng, int(study_counts.sum()), 50_000_000, 60_000_000))
    order = rng.permutation(subjects)
    validate, test = max(1, round(0.1 * subjects)), max(1, round(0.1 * subjects))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[subject_ids[index]] = "validate" if rank < validate else "test" if rank < validate + test else "train"

    studies = []
    for index, subject_id in enumerate(subject_ids):
        subject_rng = np.random.default_rng([seed, 1, index])
        count = int(study_counts[index])
        # Log-uniform gaps of 1 day to a year: both short and long intervals are common.
        gaps = np.round(np.exp(subject_rng.uniform(0, np.log(365), size=count - 1))).astype(int)
        days = np.concatenate([[0], np.cumsum(gaps)])
        first = date(2100, 1, 1) + timedelta(days=int(subject_rng.integers(0, 90 * 365)))
        levels = np.zeros((count, len(SITES)), dtype=int)
        for column, (finding, _) in enumerate(SITES):
            stationary = transition(finding, 10_000)[0]
            levels[0, column] = subject_rng.choice(len(stationary), p=stationary)
            for visit in range(1, count):
                row = transition(finding, int(gaps[visit - 1]))[levels[visit - 1, column]]
                levels[visit, column] = subject_rng.choice(len(row), p=row)
        for visit in range(count):
            intubated = levels[visit, SITE_INDEX[DEVICES, "endotracheal tube"]] > 0
            # Ventilated patients are imaged at the bedside (portable AP, no lateral).
            view = "AP" if subject_rng.random() < (0.85 if intubated else 0.3) else "PA"
            views = [view] + (["LATERAL"] if view == "PA" and subject_rng.random() < 0.6 else [])
            sizes = [_image_size(subject_rng) for _ in views]
            hour, minute, second, millis = (int(subject_rng.integers(n)) for n in (24, 60, 60, 1000))
            dicoms = _dicom_ids(subject_rng, len(views))
            studies.append(
                Study(
                    subject_id=subject_id,
                    study_id=next(study_ids),
                    date=first + timedelta(days=int(days[visit])),
                    time=hour * 10_000 + minute * 100 + second + millis / 1000,
                    view=view,
                    levels=tuple(int(level) for level in levels[visit]),
                    images=tuple(
                        ImageRecord(dicom, image_view, rows, columns)
                        for dicom, image_view, (rows, columns) in zip(dicoms, views, sizes)
                    ),
                    split=split_of[subject_id],
                )
            )
    return studies


# ----------------------------------------------------------------------------- images
# Coordinates: y from -1 (top) to 1 (bottom), x scaled alike; frontal images show the patient's
# right on the image's left. Intensities are X-ray-like: air dark, fluid and soft tissue bright.


def _ellipse(x, y, cx, cy, rx, ry, edge=0.08):
    """1 inside, 0 outside, with a soft rim of relative width ``edge``."""
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.clip((1 - r2) / edge, 0, 1)


def _segment(x, y, start, end, width):
    """1 within width/2 of the segment, fading to 0 at ``width``."""
    (sx, sy), (ex, ey) = start, end
    dx, dy = ex - sx, ey - sy
    t = np.clip(((x - sx) * dx + (y - sy) * dy) / (dx * dx + dy * dy), 0, 1)
    distance = np.hypot(x - sx - t * dx, y - sy - t * dy)
    return np.clip((width - distance) / (width / 2), 0, 1)


def _texture(rng, rows, columns, cells=16) -> np.ndarray:
    """Smooth zero-mean noise with features about 1/cells of the image."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((columns, rows), Image.Resampling.BICUBIC))


def _paint(image, mask, value):
    image += (value - image) * mask


LUNG_CX, LUNG_CY, LUNG_RX, LUNG_RY = 0.4, -0.08, 0.3, 0.6
HEART_HALF_WIDTH = (0.25, 0.34, 0.42, 0.5)  # by cardiomegaly level: a 3 px step per side at 64 px
FLUID_HEIGHT = (0.16, 0.32, 0.52)  # effusion height by level, for a lung of half-height LUNG_RY
POCKET_WIDTH = (0.07, 0.14, 0.24)  # pneumothorax rim width by level


def _draw_frontal(study: Study, x, y, rng, texture) -> np.ndarray:
    ap = study.view == "AP"
    # Portable AP films are taken supine at shallower inspiration: smaller lungs, higher clavicles,
    # scapulae over the lungs. The heart is drawn the same size so cardiomegaly stays readable.
    lung_ry = LUNG_RY * (0.9 if ap else 1.0)
    image = np.full(x.shape, 0.04, np.float32)
    image += 0.4 * _ellipse(x, y, 0, 0.15, 0.95 if ap else 0.9, 1.25, edge=0.05)
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):
        cx = sign * LUNG_CX
        lung = _ellipse(x, y, cx, LUNG_CY, LUNG_RX, lung_ry, edge=0.06)
        hilum = np.exp(-((x - sign * 0.17) ** 2 + (y + 0.02) ** 2) / 0.03)
        _paint(image, lung, 0.13 + 0.035 * texture + 0.1 * hilum)
        pocket_level = study.level(FINDING_BY_NAME["pneumothorax"], side)
        if pocket_level:
            # Air between chest wall and collapsed lung: dark, no lung markings, a thin pleural line.
            # The collapsed lung keeps its medial edge and base; the pocket is lateral and apical.
            width = POCKET_WIDTH[pocket_level - 1]
            inner_rx, inner_ry = LUNG_RX - width, lung_ry - 0.8 * width
            inner_cx, inner_cy = cx - sign * width, LUNG_CY + 0.8 * width
            inner = _ellipse(x, y, inner_cx, inner_cy, inner_rx, inner_ry, edge=0.03)
            _paint(image, lung * (1 - inner), 0.02)
            radius = np.sqrt(((x - inner_cx) / inner_rx) ** 2 + ((y - inner_cy) / inner_ry) ** 2)
            pocket_side = (sign * (x - inner_cx) / inner_rx - (y - inner_cy) / inner_ry) > 0
            image += 0.35 * lung * pocket_side * np.clip(1 - np.abs(radius - 1) * inner_rx / 0.025, 0, 1)
        lungs[side] = lung
    cardiomegaly = study.level(FINDING_BY_NAME["cardiomegaly"], "")
    _paint(image, _ellipse(x, y, 0.07, 0.24, HEART_HALF_WIDTH[cardiomegaly], 0.3, edge=0.06), 0.52)
    _paint(image, _segment(x, y, (0, -1.1), (0, -0.45), 0.08), 0.22)  # trachea
    image += 0.07 * (np.abs(x) < 0.06)  # spine behind the mediastinum
    clavicle_y = -0.84 if ap else -0.72
    for sign in (-1, 1):
        image += 0.15 * _segment(x, y, (sign * 0.1, clavicle_y), (sign * 0.72, clavicle_y - 0.08), 0.05)
        if ap:
            image += 0.08 * _ellipse(x, y, sign * 0.74, -0.4, 0.13, 0.3)

    for side, sign in (("right", -1), ("left", 1)):
        cx, lung = sign * LUNG_CX, lungs[side]
        effusion = study.level(FINDING_BY_NAME["pleural effusion"], side)
        if effusion:
            # Fluid fills the costophrenic angle; its meniscus climbs the lateral chest wall.
            lateral = np.clip(sign * (x - cx) / LUNG_RX, 0, 1)
            top = LUNG_CY + lung_ry - FLUID_HEIGHT[effusion - 1] * lung_ry / LUNG_RY - 0.12 * lateral
            region = _ellipse(x, y, cx, LUNG_CY, LUNG_RX * 1.05, lung_ry * 1.05, edge=0.04)
            _paint(image, region * np.clip((y - top) / 0.03, 0, 1), 0.58)
        if study.level(FINDING_BY_NAME["atelectasis"], side):
            tilt = sign * 0.15
            u = (x - cx) * np.cos(tilt) + (y - 0.3 * lung_ry / LUNG_RY) * np.sin(tilt)
            v = -(x - cx) * np.sin(tilt) + (y - 0.3 * lung_ry / LUNG_RY) * np.cos(tilt)
            image += 0.3 * lung * _ellipse(u, v, 0, 0, 0.2, 0.04, edge=0.5)
        for height in ("upper", "lower"):
            zone_x = cx + rng.normal(0, 0.03)
            zone_y = (-0.34 if height == "upper" else 0.14) * lung_ry / LUNG_RY + rng.normal(0, 0.03)
            if study.level(FINDING_BY_NAME["lung opacity"], f"{side} {height}"):
                blob = np.exp(-((x - zone_x) ** 2 + (y - zone_y) ** 2) / (2 * 0.12**2))
                image += 0.38 * lung * blob * (0.75 + 0.25 * texture)
            if study.level(FINDING_BY_NAME["consolidation"], f"{side} {height}"):
                image += 0.4 * lung * _ellipse(x, y, zone_x, zone_y, 0.15, 0.13, edge=0.35)

    if study.level(DEVICES, "endotracheal tube"):
        _paint(image, _segment(x, y, (0.0, -1.1), (0.0, -0.42), 0.03), 0.95)
    if study.level(DEVICES, "central line"):
        line = np.maximum(
            _segment(x, y, (-0.55, -1.0), (-0.22, -0.72), 0.025),
            _segment(x, y, (-0.22, -0.72), (-0.1, -0.22), 0.025),
        )
        _paint(image, line, 0.9)
    return image


def _draw_lateral(study: Study, x, y, texture) -> np.ndarray:
    """Patient facing the image's left: sternum left, spine right, heart anterior and low."""
    findings = study.findings
    image = np.full(x.shape, 0.04, np.float32)
    image += 0.4 * _ellipse(x, y, 0, 0.12, 0.88, 1.25, edge=0.05)
    lung = _ellipse(x, y, 0.02, -0.06, 0.56, 0.6, edge=0.06)
    _paint(image, lung, 0.2 + 0.04 * texture)
    cardiomegaly = study.level(FINDING_BY_NAME["cardiomegaly"], "")
    _paint(image, _ellipse(x, y, -0.24, 0.3, 0.22 + 0.07 * cardiomegaly, 0.28, edge=0.06), 0.5)
    image += 0.15 * ((x > 0.56) & (x < 0.72)) * (0.8 + 0.2 * np.sin(y * 28))  # vertebrae
    image += 0.12 * _segment(x, y, (-0.62, -0.6), (-0.58, 0.3), 0.05)  # sternum
    if FINDING_BY_NAME["pleural effusion"] in findings:
        level = findings[FINDING_BY_NAME["pleural effusion"]][0]
        # Fluid collects first in the posterior costophrenic sulcus.
        top = 0.54 - FLUID_HEIGHT[level - 1] - 0.15 * np.clip((x - 0.02) / 0.56, 0, 1)
        region = _ellipse(x, y, 0.02, -0.06, 0.59, 0.63, edge=0.04)
        _paint(image, region * np.clip((y - top) / 0.03, 0, 1), 0.58)
    for name, amount in (("lung opacity", 0.2), ("consolidation", 0.35)):
        sites = findings.get(FINDING_BY_NAME[name], (0, ()))[1]
        for height, zone_y in (("upper", -0.3), ("lower", 0.15)):
            if any(site.endswith(height) for site in sites):
                image += amount * lung * _ellipse(x, y, 0.05, zone_y, 0.18, 0.14, edge=0.5)
    if FINDING_BY_NAME["atelectasis"] in findings:
        image += 0.25 * lung * _ellipse(x, y, 0.1, 0.3, 0.22, 0.035, edge=0.5)
    if study.level(DEVICES, "endotracheal tube"):
        _paint(image, _segment(x, y, (-0.3, -1.1), (-0.2, -0.45), 0.03), 0.95)
    return image


def _markers(view: str, frame_x, frame_y) -> list[np.ndarray]:
    """Detector-fixed lead markers (they do not move with the patient): one shape per view."""

    def box(x0, x1, y0, y1):
        return (frame_x > x0) & (frame_x < x1) & (frame_y > y0) & (frame_y < y1)

    if view == "PA":
        return [box(0.76, 0.86, 0.04, 0.13)]
    if view == "AP":
        return [box(0.14, 0.24, 0.04, 0.13), box(0.14, 0.3, 0.15, 0.18)]
    return [box(0.8, 0.84, 0.04, 0.2)]


def render_image(study: Study, image: ImageRecord, rng: np.random.Generator) -> np.ndarray:
    """The image's pixels, (rows, columns) uint8, with pose, exposure and noise jitter."""
    frame_y, frame_x = np.mgrid[0 : image.rows, 0 : image.columns].astype(np.float32)
    frame_y, frame_x = (frame_y + 0.5) / image.rows, (frame_x + 0.5) / image.columns
    angle, scale = rng.normal(0, 0.035), rng.uniform(0.94, 1.06)
    shift_x, shift_y = rng.normal(0, 0.03, size=2)
    x0 = (frame_x * 2 - 1) * image.columns / image.rows - shift_x
    y0 = frame_y * 2 - 1 - shift_y
    x = (np.cos(angle) * x0 + np.sin(angle) * y0) / scale
    y = (-np.sin(angle) * x0 + np.cos(angle) * y0) / scale
    texture = _texture(rng, image.rows, image.columns)
    if image.view == "LATERAL":
        pixels = _draw_lateral(study, x, y, texture)
    else:
        pixels = _draw_frontal(study, x, y, rng, texture)
    for marker in _markers(image.view, frame_x, frame_y):
        _paint(pixels, marker, 0.97)
    pixels = gaussian_filter(pixels, sigma=image.rows / 220)
    contrast, brightness, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.04, 0.04), rng.uniform(0.8, 1.25)
    pixels = np.clip((pixels - 0.35) * contrast + 0.35 + brightness, 0, 1) ** gamma
    pixels += rng.normal(0, rng.uniform(0.015, 0.035), size=pixels.shape)
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- text


def location(finding: Finding, sites: tuple[str, ...]) -> str | None:
    """Where a finding sits, as Medical-Diff-VQA words (``left lower lung``, ``bilateral``)."""
    if finding.sites == ("",):
        return None
    if len({site.split()[0] for site in sites}) == 2:
        return "bilateral"
    side = sites[0].split()[0]
    if finding.sites == ZONES:
        return f"{sites[0]} lung" if len(sites) == 1 else f"{side} lung"
    if finding.name == "atelectasis":
        return f"{side} lower lung"
    return f"{side} lung"


def _listing(items: list[str]) -> str:
    # The dataset's generator writes every item but the last as " item," and the last as
    # " and item": two items read "a, and b". Reproduced so loaders and metrics see real text.
    if len(items) == 1:
        return " " + items[0]
    return "".join(f" {item}," for item in items[:-1]) + f" and {items[-1]}"


def _level_change(finding: Finding, before: int, now: int) -> str:
    return f"the level of {finding.name} has changed from {finding.level_name(before)} to {finding.level_name(now)}."


def difference_answer(reference: Study, main: Study) -> str:
    """Medical-Diff-VQA's answer to "what has changed compared to the reference image?".

    As the dataset's generator: level changes first, then added, then missing findings (in
    official order), sentences joined by one space; without its trailing space.
    """
    before, now = reference.findings, main.findings
    sentences = [
        _level_change(finding, before[finding][0], now[finding][0])
        for finding in now
        if finding.levels and finding in before and before[finding][0] != now[finding][0]
    ]
    added = [finding.name for finding in now if finding not in before]
    missing = [finding.name for finding in before if finding not in now]
    if added:
        noun = "an additional finding of" if len(added) == 1 else "additional findings of"
        sentences.append(f"the main image has {noun}{_listing(added)} than the reference image.")
    if missing:
        noun = "the finding of" if len(missing) == 1 else "the findings of"
        sentences.append(f"the main image is missing {noun}{_listing(missing)} than the reference image.")
    return " ".join(sentences) or "nothing has changed."


def _difference_question(reference: Study, main: Study, rng) -> tuple[str, str]:
    before, now = reference.findings, main.findings
    # The dataset asks about one area when a finding changed level on the same single side;
    # it does so whenever it can, we only sometimes, so the whole-image question stays common.
    for finding in now:
        if finding.levels and finding in before and before[finding][0] != now[finding][0]:
            area = location(finding, now[finding][1])
            same_side = area not in (None, "bilateral") and area == location(finding, before[finding][1])
            if same_side and rng.random() < 0.3:
                answer = _level_change(finding, before[finding][0], now[finding][0])
                return f"what has changed in the {area} area?", answer
    return "what has changed compared to the reference image?", difference_answer(reference, main)


# Diagnostic questions, one function per question type: (question, answer), or None where the
# study offers nothing to ask. Templates are the dataset's; `pick` draws one option at random.


def _abnormality(study: Study, pick, rng) -> tuple[str, str]:
    present = study.findings
    regions = {}
    for zone in ZONES:
        side, height = zone.split()
        names = [
            finding.name for finding, (_, sites) in present.items()
            if zone in sites or (finding.name == "atelectasis" and height == "lower" and side in sites)
        ]
        if names:
            regions[zone] = names
    choice = rng.random()
    # The yes/no template mostly for studies without findings, so its answers stay balanced.
    if not present or choice < 0.15:
        return "is there evidence of any abnormalities in this image?", "yes" if present else "no"
    if regions and choice < 0.45:
        zone = pick(sorted(regions))
        return f"what abnormalities are seen in the {zone} lung?", ", ".join(regions[zone])
    return "what abnormalities are seen in this image?", ", ".join(finding.name for finding in present)


def _presence(study: Study, pick, rng) -> tuple[str, str]:
    present = study.findings
    absent = [finding for finding in FINDINGS if finding not in present]
    areas = {finding: location(finding, sites) for finding, (_, sites) in present.items()}
    unilateral = [finding for finding, area in areas.items() if area not in (None, "bilateral")]
    bilateral = [finding for finding, area in areas.items() if area == "bilateral"]
    # "yes" a little more often where possible: the ~15% of studies without findings can only
    # answer "no", and overall yes and no should be about equally common.
    template, want_yes = int(rng.integers(4)), rng.random() < 0.58
    if template == 2 and unilateral:
        finding = pick(unilateral)
        area = areas[finding]
        if not want_yes:  # the same place on the other side, where a unilateral finding is absent
            side, rest = area.split(" ", 1)
            area = f"{OTHER_SIDE[side]} {rest}"
        return f"is there {finding.name} in the {area} area?", "yes" if want_yes else "no"
    if template == 3 and (bilateral if want_yes else unilateral):
        finding = pick(bilateral if want_yes else unilateral)
        return f"is the {finding.name} bilateral?", "yes" if want_yes else "no"
    question = pick(["is there evidence of xxx in this image?", "is there xxx?"])
    yes = bool(present) and (want_yes or not absent)
    finding = pick(list(present) if yes else absent)
    return question.replace("xxx", finding.name), "yes" if yes else "no"


def _view(study: Study, pick, rng) -> tuple[str, str]:
    view = f"{study.view} view"
    question = pick(["which view is this image taken?", "is this PA view?", "is this AP view?"])
    return question, view if question.startswith("which") else "yes" if view in question else "no"


def _location(study: Study, pick, rng) -> tuple[str, str] | None:
    areas = {finding: location(finding, sites) for finding, (_, sites) in study.findings.items()}
    located = [finding for finding, area in areas.items() if area]
    if not located:
        return None
    finding = pick(located)
    if areas[finding] != "bilateral" and rng.random() < 1 / 3:
        return f"is the {finding.name} located on the left side or right side?", f"{areas[finding].split()[0]} side"
    question = pick(["where in the image is the xxx located?", "where is the xxx?"])
    return question.replace("xxx", finding.name), f"{areas[finding]} area"


def _level(study: Study, pick, rng) -> tuple[str, str] | None:
    leveled = [finding for finding in study.findings if finding.levels]
    if not leveled:
        return None
    finding = pick(leveled)
    return f"what level is the {finding.name}?", finding.level_name(study.findings[finding][0])


def _type(study: Study, pick, rng) -> tuple[str, str] | None:
    typed = [finding for finding in study.findings if finding.kind]
    if not typed:
        return None
    finding = pick(typed)
    return f"what type is the {finding.name}?", finding.kind


DIAGNOSTIC_QUESTIONS = {
    "abnormality": _abnormality, "presence": _presence, "view": _view,
    "location": _location, "level": _level, "type": _type,
}


def _diagnostic_questions(study: Study, rng) -> list[tuple[str, str, str]]:
    """(question_type, question, answer) rows, at most one per type, as in the dataset."""

    def pick(options):
        return options[int(rng.integers(len(options)))]

    rows = []
    for question_type, ask in DIAGNOSTIC_QUESTIONS.items():
        asked = ask(study, pick, rng)
        if asked:
            rows.append((question_type, *asked))
    return rows


def _key_info(study: Study) -> dict:
    """A record of Medical-Diff-VQA's ``all_diseases.json``: the findings its report parser extracts."""
    entity = {}
    for finding, (level, sites) in study.findings.items():
        area = location(finding, sites)
        entity[finding.name] = {
            "entity_name": finding.name,
            "location": area.split() if area else None,
            "type": [finding.kind] if finding.kind else None,
            "level": finding.level_name(level).split() if finding.levels else None,
            "post_location": None,
            "location2": None,
            "type2": None,
            "level2": None,
            "post_location2": None,
        }
    return {
        "study_id": str(study.study_id),
        "subject_id": str(study.subject_id),
        "entity": entity,
        "no_entity": [finding.name for finding in FINDINGS if finding.name not in entity],
    }


def _change(before: int | None, now: int) -> str:
    if before is None:
        return ""
    if before == 0:
        return ", new since the prior study"
    return ", increased" if now > before else ", decreased" if now < before else ", unchanged"


def _site_phrase(finding: Finding, site: str, level: int) -> str:
    """How a report names one site: ``small left pleural effusion``, ``patchy lung opacity in the left upper lung``."""
    words = finding.level_name(level) if finding.levels else finding.kind
    if finding.sites == ZONES:
        return f"{words} {finding.name} in the {site} lung"
    if finding.name == "atelectasis":
        return f"{words} {finding.name} at the {site} lung base"
    return " ".join(part for part in (words, site, finding.name) if part)


def report_text(study: Study, prior: Study | None) -> str:
    """A MIMIC-CXR-style free-text report comparing with the previous study."""
    sentences, negatives = [], []
    for finding in FINDINGS:
        for site in finding.sites:
            level = study.level(finding, site)
            before = prior.level(finding, site) if prior else None
            if level:
                phrase = _site_phrase(finding, site, level)
                sentences.append(phrase[0].upper() + phrase[1:] + _change(before, level) + ".")
            elif before:
                sentences.append(f"The previously seen {_site_phrase(finding, site, before)} has resolved.")
        if not any(study.level(finding, site) for site in finding.sites):
            negatives.append(finding.name)
    if "cardiomegaly" in negatives:
        sentences.append("The heart size is normal.")
        negatives.remove("cardiomegaly")
    if negatives:
        listed = negatives[0] if len(negatives) == 1 else f"{', '.join(negatives[:-1])} or {negatives[-1]}"
        sentences.append(f"No {listed}.")
    if study.level(DEVICES, "endotracheal tube"):
        sentences.append("Endotracheal tube terminates 4 cm above the carina.")
    if study.level(DEVICES, "central line"):
        sentences.append("Right internal jugular central venous catheter terminates in the mid SVC.")
    comparison = f"Chest radiograph from ___ ({(study.date - prior.date).days} days earlier)." if prior else "None."
    return (
        "                                 FINAL REPORT\n"
        f" EXAMINATION:  {_procedure(study)}\n \n"
        " INDICATION:  ___ with shortness of breath.\n \n"
        f" COMPARISON:  {comparison}\n \n"
        f" FINDINGS: \n \n {' '.join(sentences)}\n \n"
        f" IMPRESSION: \n \n {_impression(study)}\n"
    )


def _impression(study: Study) -> str:
    present = study.findings
    items = []
    for finding, (level, sites) in present.items():
        where = (location(finding, sites) or "").removesuffix(" lung")
        words = (finding.level_name(level) if finding.levels else "", where, finding.name)
        items.append(" ".join(word for word in words if word))
    text = "; ".join(items) or "no acute cardiopulmonary process"
    if FINDING_BY_NAME["consolidation"] in present:
        text += ". Pneumonia cannot be excluded"
    return text[0].upper() + text[1:] + "."


def _procedure(study: Study) -> str:
    return "CHEST (PORTABLE AP)" if study.view == "AP" else "CHEST (PA AND LAT)"


def _chexpert_labels(study: Study) -> dict[str, float]:
    """What a CheXpert labeler reads in our report: 1.0 positive, 0.0 negated, -1.0 uncertain,
    NaN not mentioned."""
    present = {finding.name for finding in study.findings}
    labels = dict.fromkeys(CHEXPERT_LABELS, np.nan)
    for label in ("Atelectasis", "Cardiomegaly", "Consolidation", "Lung Opacity", "Pleural Effusion", "Pneumothorax"):
        labels[label] = 1.0 if label.lower() in present else 0.0
    if "consolidation" in present:
        labels["Pneumonia"] = -1.0  # "pneumonia cannot be excluded"
    if not present:
        labels["No Finding"] = 1.0
    if any(study.level(DEVICES, site) for site in DEVICES.sites):
        labels["Support Devices"] = 1.0
    return labels


# ----------------------------------------------------------------------------- writing


def _study_path(study: Study) -> Path:
    """``files/p{first two digits}/p{subject}/s{study}``: the images' folder; plus ``.txt``, the report."""
    subject = str(study.subject_id)
    return Path("files", f"p{subject[:2]}", f"p{subject}", f"s{study.study_id}")


def _pair_questions(studies: list[Study], seed: int) -> pd.DataFrame:
    by_subject: dict[int, list[Study]] = {}
    for study in studies:
        by_subject.setdefault(study.subject_id, []).append(study)
    rows = []
    for index, (subject_id, visits) in enumerate(by_subject.items()):
        rng = np.random.default_rng([seed, 2, index])
        for visit, study in enumerate(visits):
            split = DIFFVQA_SPLITS[study.split]
            # As in v1.0.1: the first study still gets diagnostic rows, its reference then being a
            # later study; only difference rows were fixed to have an earlier reference.
            earlier = visits[:visit] or visits[1:]
            reference = earlier[int(rng.integers(len(earlier)))]
            for question_type, question, answer in _diagnostic_questions(study, rng):
                rows.append((study.study_id, subject_id, reference.study_id, question_type, question, answer, split))
            if visit:
                question, answer = _difference_question(reference, study, rng)
                row = (study.study_id, subject_id, reference.study_id, "difference", question, answer, split)
                # v1.0.1 holds exact duplicate difference rows (a by-product of its order fix).
                rows.extend([row] * (2 if rng.random() < 0.02 else 1))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def generate_world(out: Path, subjects: int, seed: int) -> dict:
    """Write the whole world into ``out`` (new or empty; world.json last) and return the manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: generate_world writes into a new or empty directory")
    studies = simulate_population(subjects, seed)
    mimic, reports, diffvqa, truth = (
        out / name for name in ("mimic-cxr-jpg", "mimic-cxr-reports", "medical-diff-vqa", "truth")
    )
    for directory in (mimic, reports, diffvqa, truth):
        directory.mkdir(parents=True, exist_ok=True)

    metadata, splits, chexpert, studies_rows, truth_rows = [], [], [], [], []
    image_index = 0
    previous: Study | None = None
    for study in studies:
        prior = previous if previous is not None and previous.subject_id == study.subject_id else None
        previous = study
        for image in study.images:
            pixels = render_image(study, image, np.random.default_rng([seed, 3, image_index]))
            image_index += 1
            (mimic / _study_path(study)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(mimic / _study_path(study) / f"{image.dicom_id}.jpg", quality=90)
            procedure = _procedure(study)
            metadata.append((
                image.dicom_id, study.subject_id, study.study_id, procedure, image.view, image.rows, image.columns,
                study.study_date, study.time, procedure, VIEW_MEANINGS[image.view],
                "Recumbent" if study.view == "AP" else "Erect",
            ))
            splits.append((image.dicom_id, study.study_id, study.subject_id, study.split))
        report = reports / _study_path(study).with_suffix(".txt")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(report_text(study, prior))
        labels = _chexpert_labels(study)
        chexpert.append({"subject_id": study.subject_id, "study_id": study.study_id, **labels})
        frontal = study.images[0]
        studies_rows.append({
            "subject_id": study.subject_id, "study_id": study.study_id, **labels, "dicom_id": frontal.dicom_id,
            "view": VIEW_MEANINGS[frontal.view], "split": study.split, "study_date": study.study_date,
        })
        truth_rows.append({
            "subject_id": study.subject_id, "study_id": study.study_id, "study_date": study.study_date,
            "view": study.view, **dict(zip(SITE_COLUMNS, study.levels)),
        })

    tables = {
        "metadata": pd.DataFrame(metadata, columns=METADATA_COLUMNS),
        "split": pd.DataFrame(splits, columns=["dicom_id", "study_id", "subject_id", "split"]),
        "chexpert": pd.DataFrame(chexpert),
    }
    for name, table in tables.items():
        table.to_csv(mimic / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False, compression=GZIP)
    mimic_all = pd.DataFrame(studies_rows)
    # As the dataset's get_mimic_all.py: a pandas rank, hence 1.0, 2.0, ...
    mimic_all["study_order"] = mimic_all.groupby("subject_id")["study_date"].rank(method="min")
    mimic_all.to_csv(diffvqa / "mimic_all.csv", index=False)
    questions = _pair_questions(studies, seed)
    questions.to_csv(diffvqa / "mimic_pair_questions.csv", index=False)
    (diffvqa / "all_diseases.json").write_text(json.dumps([_key_info(study) for study in studies], indent=4))
    pd.DataFrame(truth_rows).to_csv(truth / "studies.csv", index=False)

    manifest = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "subjects": subjects,
        "seed": seed,
        "counts": {
            "subjects": subjects,
            "studies": len(studies),
            "images": image_index,
            "questions": len(questions),
            "difference_questions": int((questions["question_type"] == "difference").sum()),
        },
        "findings": {finding.name: list(finding.levels) for finding in FINDINGS},
        "truth_columns": dict(zip(SITE_COLUMNS, ([f.name, site] for f, site in SITES))),
    }
    (out / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _our_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / "world.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def ensure_world(out: str | Path, subjects: int, seed: int) -> Path:
    """``out`` holding the world for (subjects, seed), generating it only when it is not there yet.

    The world is written to a hidden sibling directory and renamed into place when complete, so an
    interrupted run never leaves a world that looks complete. An older world of ours is replaced;
    any other non-empty directory is refused.
    """
    out = Path(out)
    wanted = {"generator_version": GENERATOR_VERSION, "subjects": subjects, "seed": seed}

    def is_wanted(manifest: dict | None) -> bool:
        return manifest is not None and all(manifest.get(key) == value for key, value in wanted.items())

    existing = _our_manifest(out)
    if is_wanted(existing):
        return out
    if existing is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} exists and is not a synthetic world (no world.json written by {GENERATOR}); "
            "refusing to overwrite it: choose another directory or empty this one"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        generate_world(partial, subjects, seed)
        # Another process (a second rank) may have put the same world in place meanwhile.
        if is_wanted(_our_manifest(out)):
            return out
        if out.exists():  # empty, or an older world of ours
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.stale-", dir=out.parent))
            out.rename(stale)
            shutil.rmtree(stale)
        partial.rename(out)
    except OSError:
        if not is_wanted(_our_manifest(out)):
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="world directory (created, or reused when complete)")
    parser.add_argument("--subjects", type=int, default=125, help="number of simulated patients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = ensure_world(args.out, args.subjects, args.seed)
    counts = json.loads((out / "world.json").read_text())["counts"]
    print(
        f"synthetic world in {out}: {counts['subjects']} subjects, {counts['studies']} studies, "
        f"{counts['images']} images, {counts['questions']} Medical-Diff-VQA questions "
        f"({counts['difference_questions']} difference), {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
