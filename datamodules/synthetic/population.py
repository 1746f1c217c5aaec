"""The simulated world, without I/O: findings and their sites, each site's Markov chain over levels,
and the subjects' dated studies drawn from those chains.

Every finding site (a side, a lung zone, a device) follows a continuous-time Markov chain over
levels with rates per day, so the state at the next study depends on the interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property, lru_cache

import numpy as np
from scipy.linalg import expm


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
