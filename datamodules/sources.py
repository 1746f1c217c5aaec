"""The data sources a run mixes, one small config per source (Hydra instantiates them from
``data.sources``). Each turns a split into Samples through its adapter and reports what it loaded
and skipped; ``weight`` is how many times per epoch each training sample is seen on average
(``datamodules.sampling``).

``load(split, use_prior, shared)`` gives a ``SampleTable`` and its ``LoadReport``; ``shared`` is a
dict in which sources reading the same files (the diagnostic and difference sources of ``data=lumen``,
the prognostic source's studies) leave what they read, so that each file is read once. ``inputs()``
names the files a split of the source is read from, for the index cache's key (None: not cached)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules.diffvqa import TEST_POLICIES, LoadReport, load_diffvqa, one_study_per_subject, read_diffvqa, \
    read_studies
from datamodules.enhance import load_enhanced
from datamodules.mimic import table_path
from datamodules.mmxu import load_mmxu
from datamodules.prognostic import load_prognostic, read_prognostic
from datamodules.table import SampleTable


def _require(path: str | None, what: str, key: str) -> None:
    """Fails when the source is configured, before any model is built, naming the config key that
    feeds it in our data configs."""
    if path is None or not Path(path).exists():
        problem = "is not set" if path is None else f"= {path} does not exist"
        raise FileNotFoundError(f"{key} {problem}: it must point to {what}; set {key}=<path>")


def _single_image(table: SampleTable) -> SampleTable:
    """The control that shows what the current image alone can answer."""
    nothing = [None] * len(table)
    return table.with_column("prior_image", nothing).with_column("interval_days", nothing).with_column(
        "prior_study_id", nothing)


def _shared(shared: dict | None, key: tuple, read: Callable[[], Any]) -> Any:
    """``read()``, or what another source already read under ``key``."""
    if shared is None:
        return read()
    if key not in shared:
        shared[key] = read()
    return shared[key]


def _studies_key(diffvqa: str) -> tuple:
    return ("mimic_all.csv", str(Path(diffvqa).resolve()))


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

    def inputs(self, split: str) -> list[Path] | None:
        tables = [Path(self.diffvqa) / "mimic_pair_questions.csv", Path(self.diffvqa) / "mimic_all.csv"]
        return tables + ([Path(self.enhanced)] if self.enhanced else [])

    def load(self, split: str, use_prior: bool, shared: dict | None = None) -> tuple[SampleTable, LoadReport]:
        def read():
            data = read_diffvqa(self.diffvqa)
            if shared is not None:
                shared.setdefault(_studies_key(self.diffvqa), data.studies)
            return data

        data = _shared(shared, ("mimic_pair_questions.csv", str(Path(self.diffvqa).resolve())), read)
        table, report = load_diffvqa(data, self.mimic_cxr_jpg, split, tuple(self.tasks), use_prior, self.test_policy)
        if self.enhanced:
            table = self._enhance(table, _shared(shared, ("enhanced", str(Path(self.enhanced).resolve())),
                                                 lambda: load_enhanced(self.enhanced)))
        return table, report

    def _enhance(self, table: SampleTable, records: dict[str, dict]) -> SampleTable:
        """The enhanced answers (``records``, by sample id) as targets, the short ones kept for metrics."""
        sample_ids, answers = table.column("sample_id").to_pylist(), table.column("answer").to_pylist()
        enhanced = []
        for sample_id, answer in zip(sample_ids, answers):
            record = records.get(sample_id)
            if record is None or record["short_answer"] != answer:
                found = "is missing" if record is None else f"has short answer {record['short_answer']!r}"
                raise ValueError(
                    f"{self.enhanced}: {sample_id} {found}, but {self.diffvqa} gives {answer!r}: the file was "
                    "built from other questions; rebuild it with `python -m datamodules.build enhance`"
                )
            enhanced.append(record["answer"])
        return table.with_column("answer", enhanced).with_column("short_answer", answers)


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

    def inputs(self, split: str) -> list[Path] | None:
        return [Path(self.path), Path(self.diffvqa) / "mimic_all.csv"]

    def load(self, split: str, use_prior: bool, shared: dict | None = None) -> tuple[SampleTable, LoadReport]:
        studies = _shared(shared, _studies_key(self.diffvqa), lambda: read_studies(self.diffvqa))
        records = _shared(shared, ("prognostic", str(Path(self.path).resolve())),
                          lambda: read_prognostic(self.path, studies))
        table, report = load_prognostic(self.path, self.diffvqa, self.mimic_cxr_jpg, split, studies=studies,
                                        records=records)
        if split == "test" and self.test_policy == "one_study_per_subject":
            study_ids = table.column("study_id").to_numpy()
            subjects = pd.DataFrame({"subject_id": table.column("subject_id").to_numpy(), "study_id": study_ids})
            kept = np.isin(study_ids, list(one_study_per_subject(subjects, seed=0)))
            report.skipped["other_study_of_subject"] += int((~kept).sum())
            table = SampleTable(table.arrow.filter(kept))
        return (table if use_prior else _single_image(table)), report


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

    def inputs(self, split: str) -> list[Path] | None:
        """What a split reads: its file and MIMIC-CXR-JPG's metadata and split tables; None (not cached)
        when the history comes from report files, which are too many to fingerprint."""
        path = getattr(self, split)
        if path is None:
            return []  # no file, no samples
        if self.history != "none" and self.reports_root is not None:
            return None
        tables = [table_path(self.mimic_cxr_jpg, stem) for stem in ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-split")]
        return [Path(path), *tables]

    def load(self, split: str, use_prior: bool, shared: dict | None = None) -> tuple[SampleTable, LoadReport]:
        path = getattr(self, split)
        if path is None:
            return SampleTable.from_columns(0), LoadReport()
        samples, report = load_mmxu(path, self.mimic_cxr_jpg, self.history, self.reports_root)
        table = SampleTable.from_samples(samples)
        return (table if use_prior else _single_image(table)), report
