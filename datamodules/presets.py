"""The questions a trained model knows, by name: each preset writes a question exactly as the training
data words it, so that a person asking about their own studies prompts the model as it was trained.

| preset | task | asks (the dataset's wording) | needs |
| --- | --- | --- | --- |
| ``difference`` | difference | what has changed compared to the reference image? | a prior |
| ``prognosis`` | prognostic | What changes can be expected in this patient's chest X-ray in 30 days? | a prior, ``days`` |
| ``abnormality`` | diagnostic | what abnormalities are seen in this image? | |
| ``presence`` | diagnostic | is there pleural effusion? | ``finding`` |
| ``view`` | diagnostic | which view is this image taken? | |
| ``location`` | diagnostic | where is the pleural effusion? | ``finding`` |
| ``level`` | diagnostic | what level is the pleural effusion? | ``finding`` |
| ``type`` | diagnostic | what type is the pleural effusion? | ``finding`` |

The difference and diagnostic wordings are Medical-Diff-VQA's templates (the synthetic world writes
the same ones, ``datamodules.synthetic.questions``); the prognostic one is the first of the prognostic
builder's templates (``datamodules.prognostic_builder.TEMPLATES``). The diagnostic presets are asked of
one image, as Medical-Diff-VQA asks them (``Question.one_image``: a prior given with them is not shown
to the model). Any other text is asked as it is: a ``free`` question, of the difference task when there
is a prior and of the diagnostic task without one. With ``options`` (2 to 4 texts, lettered A, B, ...;
MMXU's have four) a question is a single-choice question about two visits as MMXU asks them, and the
collator adds MMXU's instruction after the options.
"""

from __future__ import annotations

from dataclasses import dataclass

from datamodules.mmxu import LETTERS
from datamodules.prognostic_builder import MAX_DAYS, ask


class AskError(ValueError):
    """What is wrong with a question asked of a model, and the setting (``field``) to change."""

    def __init__(self, field: str, problem: str, kind: str | None = None):
        self.field, self.kind = field, kind or f"field {field}"
        super().__init__(problem)


@dataclass(frozen=True)
class Preset:
    task: str
    template: str  # {finding} where the preset names a finding
    needs_prior: bool = False

    @property
    def needs_finding(self) -> bool:
        return "{finding}" in self.template

    @property
    def one_image(self) -> bool:
        """Asked of the current image alone, as the dataset's diagnostic questions are."""
        return self.task == "diagnostic"


PRESETS = {
    "difference": Preset("difference", "what has changed compared to the reference image?", needs_prior=True),
    "prognosis": Preset("prognostic", "", needs_prior=True),
    "abnormality": Preset("diagnostic", "what abnormalities are seen in this image?"),
    "presence": Preset("diagnostic", "is there {finding}?"),
    "view": Preset("diagnostic", "which view is this image taken?"),
    "location": Preset("diagnostic", "where is the {finding}?"),
    "level": Preset("diagnostic", "what level is the {finding}?"),
    "type": Preset("diagnostic", "what type is the {finding}?"),
}
PROGNOSIS_TEMPLATE = 0  # "What changes can be expected in this patient's chest X-ray in {days}?"


@dataclass(frozen=True)
class Question:
    """A question ready for a ``Sample``: its text, task and question type, and its options by letter."""

    text: str
    task: str
    question_type: str
    options: dict[str, str] | None = None
    one_image: bool = False  # a preset the model was trained to answer from the current image alone


def resolve_question(question: str, has_prior: bool, days: int | None = None, finding: str | None = None,
                     options: list[str] | None = None) -> Question:
    """The question a preset name (or a free text) stands for. A preset that needs a prior, a
    ``days`` or a ``finding`` it was not given is an ``AskError`` saying what to add."""
    question = question.strip()
    if not question:
        raise AskError("question", "question is empty: give a preset (" + ", ".join(PRESETS) + ") or a question's text")
    if options is not None:
        if not has_prior:
            raise AskError("prior", "a question with options is a single-choice question about two visits, as "
                           "MMXU asks them: give a prior study too", "no prior")
        return Question(question, "mmxu", "choice", _lettered(options))
    preset = PRESETS.get(question)
    if preset is None:
        return Question(question, "difference" if has_prior else "diagnostic", "free")
    if preset.needs_prior and not has_prior:
        raise AskError("prior", f"question={question} compares two studies: give a prior study too", "no prior")
    if question == "prognosis":
        if days is None or isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
            raise AskError("days", f"question=prognosis needs days=<whole days ahead, 1 to {MAX_DAYS}> "
                             f"(the horizons the model was trained on); got days={days!r}")
        return Question(ask(PROGNOSIS_TEMPLATE, days), preset.task, "prognostic")
    if preset.needs_finding:
        if not (finding or "").strip():
            raise AskError("finding", f"question={question} asks about one finding: add finding=<its name, "
                             "e.g. 'pleural effusion'>")
        return Question(preset.template.format(finding=finding.strip().lower()), preset.task, question,
                        one_image=preset.one_image)
    return Question(preset.template, preset.task, question, one_image=preset.one_image)


def _lettered(options: list[str]) -> dict[str, str]:
    texts = [str(option).strip() for option in options]
    if not 2 <= len(texts) <= len(LETTERS) or not all(texts):
        raise AskError("options", f"options={options!r}: give 2 to {len(LETTERS)} non-empty choices, "
                         "e.g. options='[worsened,improved,no change]'")
    return dict(zip(LETTERS, texts))
