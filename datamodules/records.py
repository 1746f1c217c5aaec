"""The one record type every source adapter produces and the collator consumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TASKS = ("diagnostic", "difference", "prognostic", "mmxu")


@dataclass(frozen=True)
class Sample:
    """One question about one study (and, for two-image tasks, its prior study).

    ``interval_days`` is ``StudyDate(current) - StudyDate(prior)`` in days, present exactly when
    ``prior_image`` is. ``answer`` is the training target; ``short_answer`` the dataset's original
    short answer when ``answer`` is an enhanced full sentence (metrics score ``reference``).
    ``options`` are a single-choice question's choices by letter (``answer`` is then the letter);
    ``history`` is text about the prior study (its report, or the report's sentences about the asked
    region); ``expert`` is the expert models' predictions as text. The collator places them all.
    """

    sample_id: str
    task: str
    question_type: str
    question: str
    answer: str | None  # None for a question asked of a trained model (predict.py): it has no reference
    image: Path
    prior_image: Path | None = None
    interval_days: float | None = None
    subject_id: int | None = None
    study_id: int | None = None
    prior_study_id: int | None = None
    short_answer: str | None = None
    options: dict[str, str] | None = None
    history: str | None = None
    expert: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"sample {self.sample_id}: unknown task {self.task!r}; expected one of {TASKS}")
        if (self.prior_image is None) != (self.interval_days is None):
            raise ValueError(
                f"sample {self.sample_id}: prior_image and interval_days must be given together"
            )
        if self.options is not None and self.answer is not None and self.answer not in self.options:
            raise ValueError(
                f"sample {self.sample_id}: answer {self.answer!r} is not one of the options {sorted(self.options)}"
            )

    @property
    def has_prior(self) -> bool:
        return self.prior_image is not None

    @property
    def reference(self) -> str:
        """The answer metrics score against: the short original one where there is one."""
        return self.short_answer if self.short_answer is not None else self.answer
