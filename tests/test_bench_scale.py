"""bench/scale.py: the scaled world reaches the requested counts and its tables agree with each other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from bench.scale import MARKER, scale_world, targets
from datamodules.validate import validate

SCALE = 0.002  # of the real counts: ~750 images, ~1,400 questions from the 16-subject test world


@pytest.fixture(scope="module")
def scaled(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scaled") / "world"
    scale_world(world, out, SCALE)
    return out


def read(scaled: Path) -> dict[str, pd.DataFrame]:
    mimic, diffvqa = scaled / "mimic-cxr-jpg", scaled / "medical-diff-vqa"
    options = dict(dtype={"dicom_id": str}, keep_default_na=False, na_values=[""])
    return {
        "metadata": pd.read_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", **options),
        "split": pd.read_csv(mimic / "mimic-cxr-2.0.0-split.csv.gz", **options),
        "chexpert": pd.read_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", **options),
        "mimic_all": pd.read_csv(diffvqa / "mimic_all.csv", **options),
        "questions": pd.read_csv(diffvqa / "mimic_pair_questions.csv", **options),
        "experts": pd.read_csv(scaled / "experts" / "experts.csv", **options),
        "prognostic": pd.read_json(scaled / "prognostic" / "prognostic.jsonl", lines=True),
    }


def test_the_scaled_world_has_the_requested_counts_within_one_subject(scaled):
    tables, wanted = read(scaled), targets(SCALE)
    assert len(tables["metadata"]) == wanted["images"]
    assert len(tables["questions"]) == wanted["questions"]
    # Difference questions and studies come in whole subjects: within one subject's share of them.
    assert abs((tables["questions"]["question_type"] == "difference").sum() - wanted["difference"]) <= 10
    assert abs(tables["metadata"]["study_id"].nunique() - wanted["studies"]) <= 10
    assert json.loads((scaled / MARKER).read_text())["counts"]["images"] == wanted["images"]


def test_every_image_is_unique_and_in_every_image_table(scaled):
    tables = read(scaled)
    metadata = tables["metadata"].set_index("dicom_id")
    assert metadata.index.is_unique
    for name in ("split", "experts"):
        other = tables[name].set_index("dicom_id").loc[metadata.index]
        assert len(tables[name]) == len(metadata)
        for column in ("study_id", "subject_id"):
            assert (other[column] == metadata[column]).all()
    studies = metadata[["study_id", "subject_id"]].drop_duplicates()
    assert studies["study_id"].is_unique  # a study belongs to one subject
    assert set(tables["chexpert"]["study_id"]) == set(studies["study_id"])


def test_every_question_names_a_diffvqa_study_whose_image_is_in_the_metadata(scaled):
    tables = read(scaled)
    mimic_all = tables["mimic_all"].set_index("study_id")
    questions = tables["questions"]
    assert mimic_all.index.is_unique
    assert set(questions["study_id"]) <= set(mimic_all.index)
    difference = questions[questions["question_type"] == "difference"]
    assert set(difference["ref_id"]) <= set(mimic_all.index)
    assert (mimic_all.loc[questions["study_id"], "subject_id"].to_numpy() == questions["subject_id"].to_numpy()).all()
    metadata = tables["metadata"].set_index("dicom_id")
    assert (metadata.loc[mimic_all["dicom_id"], "study_id"].to_numpy() == mimic_all.index.to_numpy()).all()
    # The same dates: an image's StudyDate is its study's study_date.
    assert (metadata.loc[mimic_all["dicom_id"], "StudyDate"].to_numpy() == mimic_all["study_date"].to_numpy()).all()


def test_every_prognostic_record_points_to_its_difference_row(scaled):
    tables = read(scaled)
    questions, prognostic = tables["questions"], tables["prognostic"]
    source = questions.loc[prognostic["source_row"]]
    assert (source["question_type"] == "difference").all()
    assert (source["study_id"].to_numpy() == prognostic["study_id"].to_numpy()).all()
    assert (source["ref_id"].to_numpy() == prognostic["ref_id"].to_numpy()).all()
    assert (source["answer"].to_numpy() == prognostic["difference_answer"].to_numpy()).all()
    assert (prognostic["source_sample_id"] == "diffvqa-" + prognostic["source_row"].astype(str)).all()
    assert prognostic["id"].is_unique


def test_every_image_is_a_link_to_a_world_jpeg_at_the_real_path(scaled, world):
    metadata = read(scaled)["metadata"]
    for subject, study, dicom in zip(metadata["subject_id"], metadata["study_id"], metadata["dicom_id"]):
        path = scaled / "mimic-cxr-jpg" / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
        assert path.is_symlink() and path.resolve().is_relative_to((world / "mimic-cxr-jpg" / "files").resolve())
        assert path.is_file()


def test_a_second_call_with_the_same_parameters_reuses_the_scaled_world(scaled, world):
    before = os.stat(scaled / MARKER).st_mtime_ns
    _, seconds = scale_world(world, scaled, SCALE)
    assert seconds is None and os.stat(scaled / MARKER).st_mtime_ns == before


def test_datamodules_validate_finds_no_problem_in_the_scaled_world(scaled):
    lines, problems = validate(scaled / "mimic-cxr-jpg", scaled / "medical-diff-vqa",
                               prognostic=scaled / "prognostic" / "prognostic.jsonl",
                               experts=scaled / "experts" / "experts.csv")
    assert problems == [], "\n".join(problems)
