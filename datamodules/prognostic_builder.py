"""Building prognostic instructions (LUMEN): "what can be expected in N days?" asked of a
Medical-Diff-VQA difference pair (prior + current study). ``datamodules.prognostic`` loads what this
writes (its docstring holds the record schema).

For each difference row (after the Diff-VQA adapter's policies: duplicates kept once, rows with a
later reference skipped) the builder draws one of the 100 ``TEMPLATES`` and a number of days, both
from a generator seeded with (seed, row) so a record never depends on which other rows were built.
The expected answer comes from one of two backends:

- ``llm``: an OpenAI-compatible endpoint (the paper used Llama-3.2-11B-Vision-Instruct) given the
  difference question and answer, the interval between the studies and the question;
- ``rules``: offline, from the difference answer's grammar and the interval: a level change is
  expected to continue, a new finding to persist for a few weeks and then to resolve, a resolved
  one not to recur, and no change to stay no change.

The synthetic world also writes ground-truth prognoses computed from its trajectories
(``backend: "synthetic-truth"``, ``datamodules.synthetic.prognostic_truth``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.difference_grammar import LEVELS, level_readings, parse_difference
from common.llm import LLMClient
from common.prognosis_grammar import Expectation, days_phrase, describe
from common.readers import InputError
from datamodules.diffvqa import SPLITS, LoadReport, load_diffvqa, read_diffvqa

log = logging.getLogger(__name__)

PROMPT_VERSION = "prognostic-v1"
RULES_VERSION = "rules-v1"
BACKENDS = ("rules", "llm")

_STEMS = (
    "What changes can be expected in this patient's chest X-ray {when}?",
    "How is this chest X-ray likely to look {when}?",
    "What will the findings on this chest radiograph most likely be {when}?",
    "Predict how the findings in this chest X-ray will evolve {when}.",
    "What is the expected course of the findings seen here {when}?",
    "Based on these two studies, what do you expect to see {when}?",
    "How are the current abnormalities likely to progress {when}?",
    "What is the prognosis of the findings on this radiograph {when}?",
    "If a follow-up chest X-ray were taken {when}, what would it likely show?",
    "What changes would you anticipate on a follow-up radiograph {when}?",
    "Describe the likely state of this patient's chest {when}.",
    "Which findings are expected to improve, worsen or stay the same {when}?",
    "Given the change since the prior study, what is expected {when}?",
    "What should a radiologist expect on the next chest X-ray {when}?",
    "How will the abnormalities in this image most likely change {when}?",
    "What is the anticipated evolution of this chest X-ray {when}?",
    "Forecast this patient's chest X-ray findings {when}.",
    "What differences are expected between this image and one taken {when}?",
    "What is the likely outlook for the findings in this study {when}?",
    "How do you expect this patient's chest radiograph to change {when}?",
)
_WHEN = ("in {days}", "after {days}", "{days} from now", "in {days}' time", "at a follow-up {days} later")
# 20 stems x 5 ways of saying when: template t is stem t // 5 with time phrase t % 5.
TEMPLATES = tuple(stem.replace("{when}", when) for stem in _STEMS for when in _WHEN)
# Asked horizons: log-uniform over 1 day to a year, as the intervals between studies are.
MAX_DAYS = 365

SYSTEM_PROMPT = (
    "You are a radiologist. You are given the change between a patient's prior and current chest "
    "X-ray, the number of days between them, and a question about what to expect after a further "
    "number of days. Answer in one to three sentences with the most likely course of the findings "
    "named in the change, taking both intervals into account. Do not invent findings. Reply with "
    "the answer only."
)


def ask(template_id: int, days: int) -> str:
    # "{days}' time" reads "30 days' time"; for one day it must read "1 day's time".
    text = TEMPLATES[template_id].replace("{days}'", "1 day's" if days == 1 else f"{days} days'")
    return text.replace("{days}", days_phrase(days))


def draw_question(seed: int, row: int) -> tuple[int, int]:
    """(template id, asked days) for one source row, independent of every other row."""
    rng = np.random.default_rng([seed, row])
    return int(rng.integers(len(TEMPLATES))), int(round(np.exp(rng.uniform(0, np.log(MAX_DAYS)))))


# A finding that newly appeared is expected to still be there within this horizon, gone after it.
NEW_FINDING_PERSISTS_DAYS = 30


def rules_answer(difference_answer: str, interval_days: float, days: int) -> str:
    """The offline backend: the trend of the difference answer, carried forward ``days`` days. A level
    sentence that reads two ways (``DifferenceFindings.ambiguous_levels``, "from mild to moderate to
    severe") has its finding persist within the interval and, beyond it, keep going the way both
    readings go (every such sentence of Diff-VQA's level words rises either way); its level is not said."""
    change = parse_difference(difference_answer)
    if not change.parsed:
        raise ValueError(f"difference answer {difference_answer!r} is not in Medical-Diff-VQA's grammar")
    expectations = []
    for finding, before, now in change.level_changes:
        # Within the interval that produced the change, the new level holds; beyond it, the trend goes on.
        if days <= interval_days:
            expectations.append(Expectation(finding, "persist", now))
        else:
            expectations.append(Expectation(finding, "keep_increasing" if _rank(now) > _rank(before) else "keep_decreasing"))
    for finding, levels in sorted(change.ambiguous_levels):
        ways = {_rank(now) > _rank(before) for before, now in level_readings(levels)}
        if days <= interval_days:
            expectations.append(Expectation(finding, "persist"))
        elif len(ways) == 1:
            expectations.append(Expectation(finding, "keep_increasing" if ways.pop() else "keep_decreasing"))
    for finding in sorted(change.added):
        course = "persist" if days <= NEW_FINDING_PERSISTS_DAYS else "resolve"
        expectations.append(Expectation(finding, course))
    expectations += [Expectation(finding, "stay_resolved") for finding in sorted(change.missing)]
    return describe(days, expectations)


def _rank(level: str) -> float:
    """A Diff-VQA level word's place from least to most; an unknown word ranks in the middle."""
    return LEVELS.index(level) if level in LEVELS else len(LEVELS) / 2


def build_prognostic(diffvqa_dir: str | Path, backend: str, client: LLMClient | None = None,
                     splits: tuple[str, ...] = SPLITS, seed: int = 0) -> tuple[list[dict], dict[str, LoadReport]]:
    """One record per usable difference row of the given splits, and the Diff-VQA load report per split."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "llm" and client is None:
        raise ValueError("backend='llm' needs an LLMClient")
    records, reports = [], {}
    data = read_diffvqa(diffvqa_dir)
    for split in splits:
        # Image paths are not needed here; the loader resolves them when the records are used.
        samples, reports[split] = load_diffvqa(data, "", split, tasks=("difference",))
        for sample in samples:
            row = int(sample.sample_id.removeprefix("diffvqa-"))
            template_id, days = draw_question(seed, row)
            records.append({
                "id": f"prognostic-{row}", "source_sample_id": sample.sample_id, "source_row": row, "split": split,
                "subject_id": sample.subject_id, "study_id": sample.study_id, "ref_id": sample.prior_study_id,
                "interval_days": sample.interval_days, "difference_question": sample.question,
                "difference_answer": sample.answer, "template_id": template_id, "days": days,
                "question": ask(template_id, days),
            })
    if backend == "llm":
        conversations = [
            [{"role": "system", "content": SYSTEM_PROMPT},
             {"role": "user", "content": (
                 f"Days between the prior and the current study: {record['interval_days']:g}\n"
                 f"Change from the prior to the current study: {record['difference_answer']}\n"
                 f"Question: {record['question']}")}]
            for record in records
        ]
        answers = [text.strip() for text in client.complete(conversations, description="prognostic")]
        model, version = client.config.model, client.prompt_version
    else:
        answers = []
        for record in records:
            try:
                answers.append(rules_answer(record["difference_answer"], record["interval_days"], record["days"]))
            except ValueError as error:
                raise InputError(data.questions.path, str(error), line=data.questions.line(record["source_row"]),
                                 field="answer") from None
        ambiguous = sum(bool(parse_difference(record["difference_answer"]).ambiguous_levels) for record in records)
        if ambiguous:
            log.info("%d difference answers have a level sentence that reads two ways (e.g. 'from mild to moderate "
                     "to severe'): their prognostic answers give that finding's course without its level", ambiguous)
        model, version = None, RULES_VERSION
    for record, answer in zip(records, answers):
        record.update(answer=answer, backend=backend, model=model, prompt_version=version)
    return records, reports
