"""Medical-Diff-VQA v1.0.1 annotations of the simulated studies: the question table with its
diagnostic and difference questions and answers, and the key-info records of ``all_diseases.json``.
Templates, wording and quirks follow the dataset's own generator."""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.synthetic.population import FINDINGS, OTHER_SIDE, ZONES, Finding, Study

PAIR_COLUMNS = ["study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"]
DIFFVQA_SPLITS = {"train": "train", "validate": "val", "test": "test"}


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


def _pair_questions(studies: list[Study], seed: int) -> pd.DataFrame:
    """The rows of ``mimic_pair_questions.csv`` for all studies (ordered by subject then date)."""
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
