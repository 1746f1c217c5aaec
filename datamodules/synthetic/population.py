"""The simulated world, without I/O: findings and their sites, each site's Markov chain, and the
subjects' dated studies drawn from those chains.

Every finding site (a side, a lung zone, a device) follows a continuous-time Markov chain with
rates per day, so the state at the next study depends on the interval. A site's state is a level
(0 absent, then the finding's levels) and, for the findings, a hidden course: a finding appears
*acute* and mostly resolves within days, while a few episodes turn *chronic* and last for years.
Studies record the levels only, so the course is seen through the history: a finding present at
two studies is likely chronic, a new one likely acute. The levels alone are therefore not Markov,
and what a finding will do next depends on the prior study as well as on the current one.
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

    A site's level is 0 (absent) up to ``len(levels)`` (or 1 for a finding without levels). With
    ``chronify`` > 0 each level exists in two courses, acute and chronic (see ``states``).
    """

    name: str  # the Medical-Diff-VQA official name
    sites: tuple[str, ...]
    levels: tuple[str, ...] = ()
    kind: str | None = None  # the answer to "what type is the xxx?"
    appear: float = 0.0  # absent -> lowest level (acute)
    resolve: float = 0.0  # acute, any level -> absent
    progress: float = 0.0  # one level up, same course
    regress: float = 0.0  # one level down, same course, never to absent (that is `resolve`)
    chronify: float = 0.0  # acute -> chronic, same level
    resolve_chronic: float = 0.0  # chronic, any level -> absent

    @property
    def top_level(self) -> int:
        return max(len(self.levels), 1)

    @property
    def courses(self) -> int:
        return 2 if self.chronify else 1

    @cached_property
    def state_levels(self) -> np.ndarray:
        """The level of each chain state: state 0 is absent, state ``c * top_level + l`` is level
        ``l`` in course ``c`` (0 acute, 1 chronic)."""
        return np.array([0] + [level for _ in range(self.courses) for level in range(1, self.top_level + 1)])

    def level_name(self, level: int) -> str:
        return self.levels[level - 1]


ZONES = ("left upper", "left lower", "right upper", "right lower")
OTHER_SIDE = {"left": "right", "right": "left"}
# Medical-Diff-VQA's official order (disease_lib.csv): finding lists in answers follow it. Levels
# are words of its level list (level_lib.csv), from least to most: "large" alone is not one.
# Rates: an acute episode lasts about ten days and one in a hundred turns chronic, lasting about
# two years. A finding seen now is then new a little less often than persisting (about 0.4 over a
# random earlier study), and over most asked horizons (a week to a year) a new finding is expected
# to resolve and a persisting one to stay: about a quarter of the prognoses differ from the best
# guess from the current study alone.
_COURSES = dict(resolve=0.1, chronify=0.001, resolve_chronic=0.0015)
FINDINGS = (
    Finding("pleural effusion", ("left", "right"), ("small", "moderate", "moderate to large"), "layering",
            appear=0.012, progress=0.02, regress=0.02, **_COURSES),
    Finding("atelectasis", ("left", "right"), (), "plate-like", appear=0.014, **_COURSES),
    Finding("cardiomegaly", ("",), ("mild", "moderate", "severe"), None,
            appear=0.024, progress=0.02, regress=0.02, **_COURSES),
    Finding("pneumothorax", ("left", "right"), ("minimal", "small", "moderate"), None,
            appear=0.006, progress=0.02, regress=0.02, **_COURSES),
    Finding("lung opacity", ZONES, (), "patchy", appear=0.008, **_COURSES),
    Finding("consolidation", ZONES, (), "dense", appear=0.006, **_COURSES),
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
    top, states = finding.top_level, len(finding.state_levels)
    rates = np.zeros((states, states))
    rates[0, 1] = finding.appear
    for course in range(finding.courses):
        for level in range(1, top + 1):
            state = course * top + level
            rates[state, 0] = finding.resolve_chronic if course else finding.resolve
            if level < top:
                rates[state, state + 1] = finding.progress
            if level > 1:
                rates[state, state - 1] = finding.regress
            if finding.courses == 2 and not course:
                rates[state, top + level] = finding.chronify
    np.fill_diagonal(rates, -rates.sum(axis=1))
    return rates


@lru_cache(maxsize=None)
def _one_day(finding: Finding) -> np.ndarray:
    return expm(_rate_matrix(finding))


@lru_cache(maxsize=None)
def transition(finding: Finding, days: int) -> np.ndarray:
    """P[a, b]: probability that a site in state a is in state b ``days`` later (``Finding.state_levels``)."""
    # A power of the one-day matrix: exact for whole days, and far cheaper than expm per interval.
    probabilities = np.clip(np.linalg.matrix_power(_one_day(finding), days), 0, None)  # rounding can dip below 0
    return probabilities / probabilities.sum(axis=1, keepdims=True)


@lru_cache(maxsize=None)
def stationary(finding: Finding) -> np.ndarray:
    """The long-run probability of each state: where a subject's first study starts."""
    return transition(finding, 20_000)[0]


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
        states = np.zeros((count, len(SITES)), dtype=int)
        for column, (finding, _) in enumerate(SITES):
            start = stationary(finding)
            states[0, column] = subject_rng.choice(len(start), p=start)
            for visit in range(1, count):
                row = transition(finding, int(gaps[visit - 1]))[states[visit - 1, column]]
                states[visit, column] = subject_rng.choice(len(row), p=row)
        levels = np.stack([finding.state_levels[states[:, column]] for column, (finding, _) in enumerate(SITES)], axis=1)
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
