"""Medical-Diff-VQA v1.0.1 annotations of the simulated studies: the question table with its
diagnostic and difference questions and answers, and the key-info records of ``all_diseases.json``.

The dataset's generator asks its questions of key-info records: per finding, the location words a
report writes before it ("left", "bilateral") or the place it names after it ("in the left lower
lung"). Here each finding's record follows from its true sites (``key_location``), and the questions
are asked of it with the generator's templates, wording and quirks, answered from the truth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from datamodules.synthetic.population import FINDINGS, OTHER_SIDE, ZONES, Finding, Study

PAIR_COLUMNS = ["study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"]
DIFFVQA_SPLITS = {"train": "train", "validate": "val", "test": "test"}
WHOLE_IMAGE = "what has changed compared to the reference image?"


def _zones(side: str | None = None, height: str | None = None) -> frozenset[str]:
    return frozenset(zone for zone in ZONES if side in (None, zone.split()[0]) and height in (None, zone.split()[1]))


# The places of the generator's post-location library that fall on this world's four lung zones, as
# reports write them ("the left lower lobe", "the right apical region") and as the generator rewords
# them in its records ("lobe" to "lung", "region" to "area", "left base" to "left lung base"), with
# the zones each covers. Its "no" questions draw from all of them, its records hold the reworded ones.
PLACES: dict[str, frozenset[str]] = {
    **{place.format(side=side): _zones(side, "upper") for side in OTHER_SIDE for place in (
        "the {side} upper lung", "the {side} upper lobe", "the {side} apical area", "the {side} apical region")},
    **{place.format(side=side): _zones(side, "lower") for side in OTHER_SIDE for place in (
        "the {side} lower lung", "the {side} lower lobe", "the {side} lung base", "the {side} base")},
    **dict.fromkeys(("the upper lungs", "the upper lobes", "the apical area", "the apical region"), _zones(height="upper")),
    **dict.fromkeys(("the lower lungs", "the lower lobes", "the lung bases"), _zones(height="lower")),
}


def finding_zones(finding: Finding, sites: tuple[str, ...]) -> frozenset[str]:
    """The lung zones a present finding covers; atelectasis sits at the bases, the side findings
    (effusion, pneumothorax) and cardiomegaly have no zone of their own."""
    if finding.sites == ZONES:
        return frozenset(sites)
    if finding.name == "atelectasis":
        return frozenset(f"{side} lower" for side in sites)
    return frozenset()


def key_location(finding: Finding, sites: tuple[str, ...]) -> tuple[tuple[str, ...] | None, str | None]:
    """(location words, post-location place) of a present finding's key-info record, as the
    generator reads our reports: "small left pleural effusion" gives the words ("left",), "patchy lung
    opacity in the left upper lung" the place "the left upper lung", atelectasis at both bases "the lung
    bases"; a finding over zones no place covers gives its side's word or "bilateral"; cardiomegaly
    neither."""
    if finding.sites == ("",):
        return None, None
    sides = sorted({site.split()[0] for site in sites})
    if finding.name == "atelectasis":
        return None, f"the {sides[0]} lung base" if len(sides) == 1 else "the lung bases"
    heights = {site.split()[1] for site in sites} if finding.sites == ZONES else set()
    if len(sites) == 1 and heights:
        return None, f"the {sites[0]} lung"
    if len(sides) == 2 and len(heights) == 1 and len(sites) == 2:
        return None, f"the {heights.pop()} lungs"
    return ((sides[0],) if len(sides) == 1 else ("bilateral",)), None


def _listing(items: list[str]) -> str:
    # The dataset's generator writes every item but the last as " item," and the last as
    # " and item": two items read "a, and b". Reproduced so loaders and metrics see real text.
    if len(items) == 1:
        return " " + items[0]
    return "".join(f" {item}," for item in items[:-1]) + f" and {items[-1]}"


def _level_changed(finding: Finding, reference: Study, main: Study) -> bool:
    before, now = reference.findings, main.findings
    return bool(finding.levels) and finding in before and before[finding][0] != now[finding][0]


def _level_change(finding: Finding, reference: Study, main: Study) -> str:
    before, now = reference.findings[finding][0], main.findings[finding][0]
    return f"the level of {finding.name} has changed from {finding.level_name(before)} to {finding.level_name(now)}."


def shuffled_findings(study: Study, rng: np.random.Generator) -> list[Finding]:
    """The study's present findings in a random order: the generator shuffles a record's findings
    before it compares them with the reference, so level changes and added findings come in that order."""
    findings = list(study.findings)
    return [findings[index] for index in rng.permutation(len(findings))]


def difference_answer(reference: Study, main: Study, order: list[Finding]) -> str:
    """Medical-Diff-VQA's answer to "what has changed compared to the reference image?".

    As the dataset's generator: level changes, then added findings, both in ``order`` (the main
    image's findings, shuffled: ``shuffled_findings``), then missing findings in official order;
    sentences joined by one space, without its trailing space.
    """
    before, now = reference.findings, main.findings
    sentences = [_level_change(finding, reference, main) for finding in order if _level_changed(finding, reference, main)]
    added = [finding.name for finding in order if finding not in before]
    missing = [finding.name for finding in before if finding not in now]
    if added:
        noun = "an additional finding of" if len(added) == 1 else "additional findings of"
        sentences.append(f"the main image has {noun}{_listing(added)} than the reference image.")
    if missing:
        noun = "the finding of" if len(missing) == 1 else "the findings of"
        sentences.append(f"the main image is missing {noun}{_listing(missing)} than the reference image.")
    return " ".join(sentences) or "nothing has changed."


def _difference_question(reference: Study, main: Study, rng: np.random.Generator) -> tuple[str, str]:
    order = shuffled_findings(main, rng)
    # The generator asks about one area instead when a finding changed level and both records give it
    # the same location word other than "bilateral" (a side reads "left lung"). It does so whenever it
    # can, we only sometimes, so the whole-image question stays common.
    for finding in (finding for finding in order if _level_changed(finding, reference, main)):
        words_before = key_location(finding, reference.findings[finding][1])[0] or ()
        words_now = key_location(finding, main.findings[finding][1])[0] or ()
        common = set(words_before) & set(words_now) - {"bilateral"}
        if common:
            if rng.random() < 0.3:
                return f"what has changed in the {common.pop()} lung area?", _level_change(finding, reference, main)
            break
    return WHOLE_IMAGE, difference_answer(reference, main, order)


# Diagnostic questions, one function per question type: (question, answer), or None where the
# study offers nothing to ask. Templates are the dataset's; `pick` draws one option at random.


def _locations(study: Study) -> dict[Finding, tuple[tuple[str, ...] | None, str | None]]:
    """Present findings with a location in their key-info record -> (location words, place)."""
    records = {finding: key_location(finding, sites) for finding, (_, sites) in study.findings.items()}
    return {finding: record for finding, record in records.items() if record != (None, None)}


def _abnormality(study: Study, pick, rng) -> tuple[str, str]:
    present = study.findings
    placed = {finding: place for finding, (_, place) in _locations(study).items() if place}
    choice = rng.random()
    # The yes/no template mostly for studies without findings, so its answers stay balanced.
    if not present or choice < 0.15:
        return "is there evidence of any abnormalities in this image?", "yes" if present else "no"
    if placed and choice < 0.45:
        # As the generator: one finding, asked about by the place its record names.
        finding = pick(list(placed))
        return f"what abnormalities are seen in {placed[finding]}?", finding.name
    return "what abnormalities are seen in this image?", ", ".join(finding.name for finding in present)


def _present_in_place(study: Study, pick) -> tuple[str, str] | None:
    locations = _locations(study)
    if not locations:
        return None
    finding = pick(list(locations))
    words, place = locations[finding]
    # The generator asks a bilateral finding's place only this way, so "is the xxx bilateral?" is always yes.
    if words == ("bilateral",):
        return f"is the {finding.name} bilateral?", "yes"
    if words:
        return f"is there {finding.name} in the {words[0]} lung area?", "yes"
    return f"is there {finding.name} in {place}?", "yes"


def _absent_in_place(study: Study, pick) -> tuple[str, str] | None:
    """A present finding asked about where it is not: a place of the library clear of its zones or,
    for a finding located by a side word, the other side; the generator then writes the side
    without "lung" ("the right area")."""
    locations = _locations(study)
    elsewhere = {}
    for finding, (_, place) in locations.items():
        zones = finding_zones(finding, study.findings[finding][1])
        clear = [other for other in PLACES if not PLACES[other] & zones]
        if place and clear:
            elsewhere[finding] = clear
    if elsewhere:
        finding = pick(list(elsewhere))
        return f"is there {finding.name} in {pick(elsewhere[finding])}?", "no"
    sided = [finding for finding, (words, _) in locations.items() if words and words[0] in OTHER_SIDE]
    if sided:
        finding = pick(sided)
        return f"is there {finding.name} in the {OTHER_SIDE[locations[finding][0][0]]} area?", "no"
    return None


def _presence(study: Study, pick, rng) -> tuple[str, str]:
    present = study.findings
    absent = [finding for finding in FINDINGS if finding not in present]
    # "yes" a little more often where possible: the ~15% of studies without findings can only
    # answer "no", and overall yes and no should be about equally common.
    template, want_yes = int(rng.integers(3)), rng.random() < 0.58
    if template == 2:
        asked = _present_in_place(study, pick) if want_yes else _absent_in_place(study, pick)
        if asked:
            return asked
    question = pick(["is there evidence of xxx in this image?", "is there xxx?"])
    yes = bool(present) and (want_yes or not absent)
    finding = pick(list(present) if yes else absent)
    return question.replace("xxx", finding.name), "yes" if yes else "no"


def _view(study: Study, pick, rng) -> tuple[str, str]:
    view = f"{study.view} view"
    question = pick(["which view is this image taken?", "is this PA view?", "is this AP view?"])
    return question, view if question.startswith("which") else "yes" if view in question else "no"


def _location(study: Study, pick, rng) -> tuple[str, str] | None:
    locations = _locations(study)
    if not locations:
        return None
    finding = pick(list(locations))
    words, place = locations[finding]
    sides = [side for side in OTHER_SIDE if side in (words or ()) or side in (place or "").split()]
    if len(sides) == 1 and rng.random() < 1 / 3:
        return f"is the {finding.name} located on the left side or right side?", f"{sides[0]} side"
    question = pick(["where in the image is the xxx located?", "where is the xxx?"])
    # Location words are answered as an area ("left area"), a place as the record names it.
    return question.replace("xxx", finding.name), f"{' '.join(words)} area" if words else place


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
        words, place = key_location(finding, sites)
        entity[finding.name] = {
            "entity_name": finding.name,
            "location": list(words) if words else None,
            "type": [finding.kind] if finding.kind else None,
            "level": finding.level_name(level).split() if finding.levels else None,
            "post_location": place,
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
