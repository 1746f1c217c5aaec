"""MMXU files of the simulated studies: single-choice questions on how one region changed between
consecutive studies of a subject, answered from the true site levels.

- ``mmxu/MMXU-test.jsonl``: the public test schema (keys in its order), test-split subjects only;
- ``mmxu/MMXU-dev.jsonl`` (train subjects) and ``mmxu/MMXU-val.jsonl`` (validate subjects): the dev
  schema. The real MMXU-dev has no split field, so the split is the file, drawn from MIMIC's split.

Each question asks about one site that is present in at least one of the two studies; the options
are the true change and three of the other four (new, increased, decreased, resolved, unchanged),
which exclude each other. Content types: new/increased are ``worsen``, decreased/resolved
``improved``, unchanged ``no change``. Per image pair at most three questions (changes before
``no change``); per file each content type is cut to the median count of the three, so they are
roughly balanced without emptying a file; answer letters are dealt evenly (25% each) and shuffled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datamodules.mmxu import CONTENT_TYPES, LETTERS, region_sentences
from datamodules.synthetic.drawing import HEART_HALF_WIDTH, LUNG_CX, LUNG_CY, LUNG_RX, LUNG_RY
from datamodules.synthetic.population import FINDING_BY_NAME, FINDINGS, Finding, ImageRecord, Study
from datamodules.synthetic.reports import report_text

CHANGES = {
    "new": "It is new since the previous image",
    "increased": "It has increased",
    "decreased": "It has decreased but persists",
    "resolved": "It has resolved",
    "unchanged": "It is unchanged",
}
CONTENT_TYPE = {"new": "worsen", "increased": "worsen", "decreased": "improved", "resolved": "improved",
                "unchanged": "no change"}
# MIMIC split -> (file, manifest count).
FILES = {"test": ("MMXU-test.jsonl", "mmxu_test"), "train": ("MMXU-dev.jsonl", "mmxu_dev"),
         "validate": ("MMXU-val.jsonl", "mmxu_val")}
QUESTIONS_PER_PAIR = 3


def site_region(finding: Finding, site: str) -> str:
    """The Chest ImaGenome region where the drawing puts a site."""
    if finding.name == "pleural effusion":
        return f"{site} costophrenic angle"  # the fluid fills the angle first
    if finding.name == "atelectasis":
        return f"{site} lower lung zone"  # drawn as a plate at the lung base
    if finding.name == "cardiomegaly":
        return "cardiac silhouette"
    if finding.name == "pneumothorax":
        return f"{site} lung"  # the pocket runs along the apex and the whole lateral wall
    return f"{site} lung zone"  # opacity and consolidation zones: "left upper" -> "left upper lung zone"


def _subject(finding: Finding, region: str) -> str:
    if finding.name == "cardiomegaly":
        return "the enlargement of the cardiac silhouette"
    preposition = "at" if region.endswith("angle") else "in"
    return f"the {finding.name} {preposition} the {region}"


def change(before: int, now: int) -> str | None:
    """How a site's level moved; None when it is absent in both studies (nothing to ask)."""
    if before == now == 0:
        return None
    if before == 0:
        return "new"
    if now == 0:
        return "resolved"
    return "increased" if now > before else "decreased" if now < before else "unchanged"


def _state(finding: Finding, level: int) -> str:
    if level == 0:
        return "absent"
    return finding.level_name(level) if finding.levels else "present"


def region_boxes(study: Study, image: ImageRecord) -> dict[str, list[int]]:
    """[x1, y1, x2, y2] pixel boxes of the regions the questions use, from the drawing's geometry
    (without its pose jitter: approximate by a few pixels)."""
    lung_ry = LUNG_RY * (0.9 if study.view == "AP" else 1.0)  # as drawing._draw_frontal

    def pixels(x1, y1, x2, y2) -> list[int]:
        # Drawing coordinates: y from -1 (top) to 1 (bottom), x in the same units from the centre.
        columns = [(x * image.rows + image.columns) / 2 for x in (x1, x2)]
        rows = [(y + 1) / 2 * image.rows for y in (y1, y2)]
        return [int(np.clip(round(columns[0]), 0, image.columns - 1)), int(np.clip(round(rows[0]), 0, image.rows - 1)),
                int(np.clip(round(columns[1]), 0, image.columns - 1)), int(np.clip(round(rows[1]), 0, image.rows - 1))]

    top, bottom = LUNG_CY - lung_ry, LUNG_CY + lung_ry
    third = 2 * lung_ry / 3
    boxes = {}
    for side, sign in (("right", -1), ("left", 1)):  # the patient's right is on the image's left
        left, right = sign * LUNG_CX - LUNG_RX, sign * LUNG_CX + LUNG_RX
        lateral = (left, sign * LUNG_CX) if sign < 0 else (sign * LUNG_CX, right)
        boxes[f"{side} lung"] = pixels(left, top, right, bottom)
        boxes[f"{side} upper lung zone"] = pixels(left, top, right, top + third)
        boxes[f"{side} mid lung zone"] = pixels(left, top + third, right, top + 2 * third)
        boxes[f"{side} lower lung zone"] = pixels(left, top + 2 * third, right, bottom)
        boxes[f"{side} apical zone"] = pixels(left, top, right, top + 0.4 * lung_ry)
        boxes[f"{side} costophrenic angle"] = pixels(lateral[0], bottom - 0.4 * lung_ry, lateral[1], bottom)
    half_width = HEART_HALF_WIDTH[study.level(FINDING_BY_NAME["cardiomegaly"], "")]
    boxes["cardiac silhouette"] = pixels(0.07 - half_width, -0.06, 0.07 + half_width, 0.54)
    return boxes


def _questions(prior: Study, current: Study, rng: np.random.Generator) -> list[dict]:
    """Up to three questions about one image pair, changes before unchanged sites."""
    asked = []
    for finding in FINDINGS:
        for site in finding.sites:
            before, now = prior.level(finding, site), current.level(finding, site)
            moved = change(before, now)
            if moved is None:
                continue
            region = site_region(finding, site)
            subject = _subject(finding, region)
            asked.append({
                "change": moved,
                "region": region,
                "question": f"How has {subject} changed compared with the previous image?",
                "explanation": f"In the previous image {subject} was {_state(finding, before)}; "
                               f"in the current image it is {_state(finding, now)}.",
            })
    order = rng.permutation(len(asked))
    asked = [asked[index] for index in order]
    asked.sort(key=lambda question: question["change"] == "unchanged")  # stable: shuffled within each group
    return asked[:QUESTIONS_PER_PAIR]


def _balanced(questions: list[dict], rng: np.random.Generator) -> list[dict]:
    """Each content type cut to the median count of the three (at random), in the original order."""
    by_type = {kind: [i for i, q in enumerate(questions) if CONTENT_TYPE[q["change"]] == kind] for kind in CONTENT_TYPES}
    limit = int(np.median([len(indices) for indices in by_type.values()]))
    kept = set()
    for indices in by_type.values():
        kept.update(rng.permutation(indices)[:limit].tolist() if len(indices) > limit else indices)
    return [questions[i] for i in sorted(kept)]


def _relative_path(study: Study) -> str:
    subject = str(study.subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study.study_id}/{study.images[0].dicom_id}.jpg"


def _rows(questions: list[dict], schema: str, rng: np.random.Generator) -> list[dict]:
    """JSON rows with options shuffled so that each letter is the answer about a quarter of the time."""
    answers = rng.permutation(np.resize(np.arange(len(LETTERS)), len(questions)))
    rows = []
    for index, (question, answer) in enumerate(zip(questions, answers)):
        distractors = [text for name, text in CHANGES.items() if name != question["change"]]
        texts = [distractors[i] for i in rng.permutation(len(distractors))[:len(LETTERS) - 1]]
        texts.insert(int(answer), CHANGES[question["change"]])
        prior, current = question["prior"], question["current"]
        row = {
            "id": index,
            "content_type": CONTENT_TYPE[question["change"]],
            "question": question["question"],
            "options": dict(zip(LETTERS, texts)),
            "answer": LETTERS[answer],
        }
        if schema == "test":
            row |= {"cur_image_path": _relative_path(current), "prior_image_path": _relative_path(prior)}
        else:
            cur_report = question["cur_report"]
            row |= {
                "related_region_name": question["region"],
                "explanation": question["explanation"],
                "cur_image_path": _relative_path(current),
                "cur_report": cur_report,
                "cur_region_report": " ".join(region_sentences(cur_report, question["region"])),
                "cur_image_bboxs": region_boxes(current, current.images[0]),
                "prior_image_path": [_relative_path(prior)],
                "prior_report": question["prior_report"],
                "prior_image_bboxs": region_boxes(prior, prior.images[0]),
            }
        rows.append(row)
    return rows


def write_mmxu(out: Path, studies: list[Study], seed: int) -> dict[str, int]:
    """Writes ``out/mmxu/*.jsonl`` for the world's studies (ordered by subject then date) and
    returns the question count per file, for the manifest."""
    rng = np.random.default_rng([seed, 4])
    reports, questions = {}, {split: [] for split in FILES}
    previous: Study | None = None
    for study in studies:
        prior = previous if previous is not None and previous.subject_id == study.subject_id else None
        reports[study.study_id] = report_text(study, prior)
        if prior is not None:
            for question in _questions(prior, study, rng):
                question |= {"prior": prior, "current": study, "prior_report": reports[prior.study_id],
                             "cur_report": reports[study.study_id]}
                questions[study.split].append(question)
        previous = study
    directory = Path(out) / "mmxu"
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, (name, count) in FILES.items():
        rows = _rows(_balanced(questions[split], rng), "test" if split == "test" else "dev", rng)
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        counts[count] = len(rows)
    return counts
