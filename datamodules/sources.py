"""The data sources a run mixes, one small config per source (Hydra instantiates them from
``data.sources``). Each turns a split into Samples through its adapter and reports what it loaded
and skipped; ``weight`` is how many times per epoch each training sample is seen on average
(``datamodules.sampling``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import pandas as pd

from datamodules.diffvqa import TEST_POLICIES, LoadReport, load_diffvqa, one_study_per_subject
from datamodules.enhance import load_enhanced
from datamodules.mmxu import load_mmxu
from datamodules.prognostic import load_prognostic
from datamodules.records import Sample


def _require(path: str | None, what: str, key: str) -> None:
    """Fails when the source is configured, before any model is built, naming the config key that
    feeds it in our data configs."""
    if path is None or not Path(path).exists():
        problem = "is not set" if path is None else f"= {path} does not exist"
        raise FileNotFoundError(f"{key} {problem}: it must point to {what}; set {key}=<path>")


def _single_image(sample: Sample) -> Sample:
    """The control that shows what the current image alone can answer."""
    return replace(sample, prior_image=None, interval_days=None, prior_study_id=None)


@dataclass
class DiffVQASource:
    """Medical-Diff-VQA questions of the given tasks (``diagnostic``, ``difference``).

    ``enhanced``: a JSONL from ``python -m datamodules.build enhance``; its full sentences become the
    training targets and the dataset's short answers stay beside them for metrics.
    """

    diffvqa: str
    mimic_cxr_jpg: str
    tasks: tuple[str, ...] = ("diagnostic", "difference")
    test_policy: str = "all"
    enhanced: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.diffvqa, "the Medical-Diff-VQA directory (mimic_pair_questions.csv, mimic_all.csv)",
                 "paths.diffvqa")
        if self.enhanced is not None:
            _require(self.enhanced, "a JSONL from `python -m datamodules.build enhance`", "data.sources.<name>.enhanced")

    @cached_property
    def _enhanced(self) -> dict[str, dict]:
        return load_enhanced(self.enhanced)

    def load(self, split: str, use_prior: bool) -> tuple[list[Sample], LoadReport]:
        samples, report = load_diffvqa(self.diffvqa, self.mimic_cxr_jpg, split, tuple(self.tasks), use_prior,
                                       self.test_policy)
        if self.enhanced:
            samples = [self._enhance(sample) for sample in samples]
        return samples, report

    def _enhance(self, sample: Sample) -> Sample:
        record = self._enhanced.get(sample.sample_id)
        if record is None or record["short_answer"] != sample.answer:
            found = "is missing" if record is None else f"has short answer {record['short_answer']!r}"
            raise ValueError(
                f"{self.enhanced}: {sample.sample_id} {found}, but {self.diffvqa} gives {sample.answer!r}: the "
                "file was built from other questions; rebuild it with `python -m datamodules.build enhance`"
            )
        return replace(sample, answer=record["answer"], short_answer=sample.answer)


@dataclass
class PrognosticSource:
    """Prognostic questions from a JSONL of ``python -m datamodules.build prognostic`` (or the
    synthetic world's ground truth), on the difference pair's two images. ``test_policy`` as for
    Medical-Diff-VQA: ``one_study_per_subject`` keeps the questions of one study per test subject."""

    path: str
    diffvqa: str
    mimic_cxr_jpg: str
    test_policy: str = "all"
    weight: float = 1.0
    tasks = ("prognostic",)

    def __post_init__(self) -> None:
        _require(self.path, "a JSONL from `python -m datamodules.build prognostic` (or the synthetic world's "
                 "prognostic/prognostic.jsonl)", "paths.prognostic")
        if self.test_policy not in TEST_POLICIES:
            raise ValueError(f"test_policy={self.test_policy!r}: expected one of {TEST_POLICIES}")

    def load(self, split: str, use_prior: bool) -> tuple[list[Sample], LoadReport]:
        samples, report = load_prognostic(self.path, self.diffvqa, self.mimic_cxr_jpg, split)
        if split == "test" and self.test_policy == "one_study_per_subject":
            studies = pd.DataFrame([(s.subject_id, s.study_id) for s in samples], columns=["subject_id", "study_id"])
            kept = one_study_per_subject(studies, seed=0)
            report.skipped["other_study_of_subject"] += sum(s.study_id not in kept for s in samples)
            samples = [s for s in samples if s.study_id in kept]
        return (samples if use_prior else [_single_image(sample) for sample in samples]), report


@dataclass
class MMXUSource:
    """MMXU single-choice questions, one JSONL per split (the public test file, MMXU-dev for training;
    a split without a file has no samples). ``history``: ``none``, ``global`` or ``regional`` prior
    report (``datamodules.mmxu``); ``reports_root`` is the MIMIC-CXR reports directory, for rows
    without their own ``prior_report``."""

    mimic_cxr_jpg: str
    train: str | None = None
    val: str | None = None
    test: str | None = None
    history: str = "none"
    reports_root: str | None = None
    weight: float = 1.0
    tasks = ("mmxu",)

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            if getattr(self, split) is not None:
                _require(getattr(self, split), "an MMXU JSONL file", f"data.sources.<name>.{split}")

    def load(self, split: str, use_prior: bool) -> tuple[list[Sample], LoadReport]:
        path = getattr(self, split)
        if path is None:
            return [], LoadReport()
        samples, report = load_mmxu(path, self.mimic_cxr_jpg, self.history, self.reports_root)
        return (samples if use_prior else [_single_image(sample) for sample in samples]), report

