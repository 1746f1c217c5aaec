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
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pa_csv

from common.readers import InputError, Problems, read_text, raise_or_record

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


def _number(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # NaN fails too
            raise ValueError(f"{text!r} is not a number in [{low}, {high}]")
        return value
    return parse


def _choice(choices: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {list(choices)}")
        return text
    return parse


def _identifier(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def _dicom_id(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


def _prediction(row: dict[str, str], path: Path, line: int) -> ExpertPrediction:
    def field(name: str, parse):
        try:
            return parse(row[name])
        except ValueError as error:
            raise InputError(path, str(error), line=line, field=name, kind=f"malformed {name}") from None

    probability = _number(0.0, 1.0)
    return ExpertPrediction(
        dicom_id=field("dicom_id", _dicom_id),
        subject_id=field("subject_id", _identifier),
        study_id=field("study_id", _identifier),
        probabilities=tuple(field(name, probability) for name in PATHOLOGIES),
        age_years=field("age_years", _number(0.0, 150.0)),
        race=field("race", _choice(RACES)),
        race_probabilities=tuple(field(name, probability) for name in RACE_COLUMNS),
        view=field("view", _choice(VIEWS)),
    )


def load_experts(path: str | Path, problems: Problems | None = None) -> dict[str, ExpertPrediction]:
    """dicom_id -> its predictions, from a CSV of schema ``SCHEMA_VERSION`` (extra columns are
    ignored). A missing column, a malformed value or a repeated dicom_id is an error naming the
    file, the line and the field (with ``problems``: recorded, and the row left out)."""
    path = Path(path)
    text = read_text(path, "an expert CSV: build it with `python -m datamodules.build experts`")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        found = "the file is empty" if not text.strip() else f"missing columns {missing}"
        raise InputError(path, f"{found}; an expert CSV of schema {SCHEMA_VERSION} has {list(COLUMNS)}",
                         fix="rebuild it with python -m datamodules.build experts")
    predictions: dict[str, ExpertPrediction] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        try:
            if None in row or None in row.values():
                raise InputError(path, f"the row does not have the header's {len(reader.fieldnames)} fields",
                                 line=line, kind="wrong number of fields")
            prediction = _prediction(row, path, line)
            if prediction.dicom_id in predictions:
                raise InputError(path, f"{prediction.dicom_id} repeats line {first_line[prediction.dicom_id]}",
                                 line=line, field="dicom_id", kind="repeated dicom_id")
        except InputError as error:
            raise_or_record(problems, error)
            continue
        predictions[prediction.dicom_id] = prediction
        first_line[prediction.dicom_id] = line
    return predictions


def read_experts(path: str | Path, problems: Problems | None = None) -> pd.DataFrame:
    """The CSV as columns, one row per image, indexed by ``dicom_id``: the ``PATHOLOGIES``
    probabilities, ``age_years``, ``race`` and ``view``. Checked as ``load_experts`` checks it: a
    file that passes column by column is read so; any other is read row by row by ``load_experts``
    (which raises its first problem, or with ``problems`` records each and leaves its row out)."""
    path = Path(path)
    text = read_text(path, "an expert CSV: build it with `python -m datamodules.build experts`")
    frame = _clean_experts(text)
    if frame is not None:
        return frame
    predictions = load_experts(path, problems)
    return pd.DataFrame(
        [(*prediction.probabilities, prediction.age_years, prediction.race, prediction.view)
         for prediction in predictions.values()], columns=[*PATHOLOGIES, "age_years", "race", "view"],
        index=pd.Index(list(predictions), name="dicom_id"))


def _clean_experts(text: str) -> pd.DataFrame | None:
    """The table when every row passes the checks of ``load_experts``, else None. Parsed by Arrow's
    CSV reader, which refuses what is not a number in a number column."""
    numbers = (*PATHOLOGIES, *RACE_COLUMNS, "age_years")
    raw_lines = text.count("\n") + (not text.endswith("\n"))
    if '"' in text or "\r" in text or text.startswith("\ufeff"):  # quoted values, CRs, a BOM: read row by row
        return None
    try:
        table = pa_csv.read_csv(pa.py_buffer(text.encode()), convert_options=pa_csv.ConvertOptions(
            column_types={**{name: pa.float64() for name in numbers},
                          **{name: pa.string() for name in ("dicom_id", "subject_id", "study_id", "race", "view")}},
            include_columns=list(COLUMNS), strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowKeyError, KeyError):  # a column missing, a value not a number, a short row
        return None
    if table.num_rows == 0 or raw_lines != table.num_rows + 1:  # blank lines: read row by row
        return None
    for columns, low, high in ((PATHOLOGIES + RACE_COLUMNS, 0.0, 1.0), (("age_years",), 0.0, 150.0)):
        for column in columns:
            values = table.column(column).to_numpy()
            if not ((values >= low) & (values <= high)).all():  # NaN and no value fail too
                return None
    whole = all(pc.all(pc.match_substring_regex(table.column(name), r"^[0-9]+$")).as_py()
                for name in ("subject_id", "study_id"))
    dicom_ids = table.column("dicom_id")
    if not (whole and pc.all(pc.not_equal(dicom_ids, "")).as_py()
            and pc.count_distinct(dicom_ids).as_py() == table.num_rows
            and pc.all(pc.is_in(table.column("race"), value_set=pa.array(RACES))).as_py()
            and pc.all(pc.is_in(table.column("view"), value_set=pa.array(VIEWS))).as_py()):
        return None
    frame = pd.DataFrame({name: table.column(name).to_numpy() for name in (*PATHOLOGIES, "age_years")})
    frame["race"] = table.column("race").to_numpy(zero_copy_only=False)
    frame["view"] = table.column("view").to_numpy(zero_copy_only=False)
    return frame.set_index(pd.Index(dicom_ids.to_numpy(zero_copy_only=False), name="dicom_id"))


def expert_texts(table: pd.DataFrame, demographics: bool = True) -> pd.Series:
    """``expert_text`` of every row of ``read_experts``' table, column by column (Arrow's string kernels)."""
    bounds = np.array([bound for bound, _ in LEVELS[:-1]])
    words = pa.array([word for _, word in LEVELS])
    parts: list = ["Expert models' findings on the current image: "]
    for number, pathology in enumerate(PATHOLOGIES):
        parts += [("; " if number else "") + f"{_pathology_name(pathology)}: ",
                  words.take(np.searchsorted(bounds, table[pathology].to_numpy(), side="right"))]
    parts.append(".")
    if demographics:
        # numpy rounds halves to even, as Python's round does.
        ages = pa.array(np.round(table["age_years"].to_numpy()).astype(np.int64)).cast(pa.string())
        parts += [" Estimated age: ", ages, " years; race: ", pa.array(table["race"].to_numpy(dtype=object)),
                  "; view: ", pc.utf8_lower(pa.array(table["view"].to_numpy(dtype=object))), "."]
    text = pc.binary_join_element_wise(*parts, "")
    return pd.Series(text.to_numpy(zero_copy_only=False), index=table.index, dtype=object)
