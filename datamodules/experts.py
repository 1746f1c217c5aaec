"""Expert-model predictions for an image (D-Rax style): the CSV they are kept in, and the text the
collator puts before the question.

The CSV (schema ``SCHEMA_VERSION``) has one row per image, keyed by ``dicom_id`` (the JPEG's file
stem), with the columns of ``COLUMNS``:

- ``dicom_id``, ``subject_id``, ``study_id``;
- one column per pathology of ``PATHOLOGIES``, named as TorchXRayVision names it: the calibrated
  probability in [0, 1] of ``densenet121-res224-all`` (0.5 is the model's operating point);
- ``age_years``: the estimated age in years;
- ``race``: the most probable of ``RACES``, and ``race_asian``, ``race_black``, ``race_white``: the
  three probabilities;
- ``view``: ``Frontal`` or ``Lateral``.

``datamodules.experts_builder`` writes it from images, ``datamodules.synthetic.experts`` for the
synthetic world. A probability becomes one of four words (``level``), after D-Rax.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1  # raise it when COLUMNS or their meaning change
# densenet121-res224-all's outputs, in its order.
PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum",
)
RACES = ("Asian", "Black", "White")  # the emory_hiti race model's outputs, in its order
VIEWS = ("Frontal", "Lateral")  # the xinario view model's outputs, in its order
RACE_COLUMNS = tuple(f"race_{race.lower()}" for race in RACES)
COLUMNS = ("dicom_id", "subject_id", "study_id", *PATHOLOGIES, "age_years", "race", *RACE_COLUMNS, "view")
# Upper bounds of the first three levels; a probability at a bound belongs to the level above.
LEVELS = ((0.25, "no"), (0.5, "maybe no"), (0.75, "maybe yes"), (math.inf, "yes"))


@dataclass(frozen=True)
class ExpertPrediction:
    """One image's row of the CSV."""

    dicom_id: str
    subject_id: int
    study_id: int
    probabilities: tuple[float, ...]  # one per entry of PATHOLOGIES
    age_years: float
    race: str
    race_probabilities: tuple[float, ...]  # one per entry of RACES
    view: str


def level(probability: float) -> str:
    """``no`` below 0.25, ``maybe no`` below 0.5, ``maybe yes`` below 0.75, ``yes`` from 0.75."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability!r} is not in [0, 1]")
    return next(word for bound, word in LEVELS if probability < bound)


def _pathology_name(pathology: str) -> str:
    return pathology.replace("_", " ").lower()


def expert_text(prediction: ExpertPrediction, demographics: bool = True) -> str:
    """The expert models' findings on the image as prompt text: every pathology in PATHOLOGIES
    order with its level, then (with ``demographics``) age, race and view once."""
    findings = "; ".join(f"{_pathology_name(pathology)}: {level(probability)}"
                         for pathology, probability in zip(PATHOLOGIES, prediction.probabilities))
    text = f"Expert models' findings on the current image: {findings}."
    if demographics:
        text += (f" Estimated age: {round(prediction.age_years)} years; race: {prediction.race}; "
                 f"view: {prediction.view.lower()}.")
    return text


def _number(text: str, where: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{where}: {text!r} is not a number in [{low}, {high}]")
    return value


def _choice(text: str, where: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise ValueError(f"{where}: {text!r} is not one of {list(choices)}")
    return text


def _identifier(text: str, where: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{where}: {text!r} is not a whole number")
    return int(text)


def _prediction(row: dict[str, str], where: str) -> ExpertPrediction:
    """``where`` is ``"FILE line N"``; each error adds the field."""
    if not row["dicom_id"]:
        raise ValueError(f"{where}, field dicom_id: empty")
    return ExpertPrediction(
        dicom_id=row["dicom_id"],
        subject_id=_identifier(row["subject_id"], f"{where}, field subject_id"),
        study_id=_identifier(row["study_id"], f"{where}, field study_id"),
        probabilities=tuple(_number(row[name], f"{where}, field {name}", 0.0, 1.0) for name in PATHOLOGIES),
        age_years=_number(row["age_years"], f"{where}, field age_years", 0.0, 150.0),
        race=_choice(row["race"], f"{where}, field race", RACES),
        race_probabilities=tuple(_number(row[name], f"{where}, field {name}", 0.0, 1.0) for name in RACE_COLUMNS),
        view=_choice(row["view"], f"{where}, field view", VIEWS),
    )


def load_experts(path: str | Path) -> dict[str, ExpertPrediction]:
    """dicom_id -> its predictions, from a CSV of schema ``SCHEMA_VERSION`` (extra columns are
    ignored). A missing column, a malformed value or a repeated dicom_id is an error naming the
    file, the line and the field."""
    path = Path(path)
    predictions: dict[str, ExpertPrediction] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; an expert CSV of schema {SCHEMA_VERSION} has "
                             f"{list(COLUMNS)}: rebuild it with python -m datamodules.build experts")
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row or None in row.values():
                raise ValueError(f"{where}: the row does not have the header's {len(reader.fieldnames)} fields")
            prediction = _prediction(row, where)
            if prediction.dicom_id in predictions:
                raise ValueError(f"{where}, field dicom_id: {prediction.dicom_id} appears twice")
            predictions[prediction.dicom_id] = prediction
    return predictions
