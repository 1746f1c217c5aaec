"""The one record type every source adapter produces and the collator consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TASKS = ("diagnostic", "difference", "prognostic", "mmxu")


@dataclass(frozen=True)
class Sample:
    """One question about one study (and, for two-image tasks, its prior study).

    ``interval_days`` is ``StudyDate(current) - StudyDate(prior)`` in days, present exactly when
    ``prior_image`` is.
    """

    sample_id: str
    task: str
    question_type: str
    question: str
    answer: str
    image: Path
    prior_image: Path | None = None
    interval_days: float | None = None
    subject_id: int | None = None
    study_id: int | None = None
    prior_study_id: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"sample {self.sample_id}: unknown task {self.task!r}; expected one of {TASKS}")
        if (self.prior_image is None) != (self.interval_days is None):
            raise ValueError(
                f"sample {self.sample_id}: prior_image and interval_days must be given together"
            )

    @property
    def has_prior(self) -> bool:
        return self.prior_image is not None
