"""demo.py: the heat map of where the model sees change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.dicom import read_study_file
from datamodules.mimic import load_images
from datamodules.pairs import make_pair
from models.config import FusionConfig, ModelConfig
from models.factory import build_model
from models.projector import TokenMerge
from run.change_map import DISPLAY_SIZE, ask_showing_change, token_heat
from run.predict import Predictor


@pytest.fixture(scope="module")
def predictor(trained_checkpoint) -> Predictor:
    return Predictor(trained_checkpoint, "cpu")


@pytest.fixture(scope="module")
def studies(world) -> tuple[Path, Path, int]:
    """Two frontal studies of one subject of the world's MIMIC-CXR-JPG tree: current, prior, and the days
    between them."""
    images = load_images(world / "mimic-cxr-jpg")
    frontal = images[images.view.isin(["PA", "AP"])].drop_duplicates("study_id")
    subject = frontal.groupby("subject_id").study_id.nunique().idxmax()
    visits = frontal[frontal.subject_id == subject].sort_values("study_datetime")
    prior, current = visits.iloc[0], visits.iloc[-1]
    return Path(current.path), Path(prior.path), (current.study_datetime - prior.study_datetime).days


# --- where the model sees change -----------------------------------------------------------------------------------


def test_a_changed_token_lights_its_own_block_of_the_image():
    magnitude = torch.tensor([0.0, 5.0, 0.0, 0.0])  # tokens row by row: (0, 0), (0, 1), (1, 0), (1, 1)
    heat = token_heat(magnitude, TokenMerge((4, 4), 2), 64)
    assert heat.shape == (64, 64)
    assert heat[16, 48] == 1  # the top-right quarter's middle
    assert heat[48, 16] == 0 and heat[16, 8] == 0


def test_a_token_over_the_merges_padding_covers_only_the_patches_it_has():
    # A 3 x 3 patch grid merged 2 x 2: token (1, 1) holds one real patch, the bottom-right one.
    heat = token_heat(torch.tensor([0.0, 0.0, 0.0, 1.0]), TokenMerge((3, 3), 2), 30)  # 10 px per patch
    assert heat[-1, -1] == 1
    assert heat[-1, 0] == 0 and heat[0, -1] == 0
    assert heat[12, 12] == 0  # the middle patch is token (0, 0)'s, however far token (1, 1)'s padding reaches


def test_the_change_map_overlays_the_current_image_and_the_answer_is_predicts(predictor, studies):
    current, prior, days = studies
    pair = make_pair("pair", read_study_file(current), read_study_file(prior), "difference", interval_days=days)
    answer, change = ask_showing_change(predictor, pair)
    assert answer.prediction == predictor.ask(pair).prediction
    assert change.size == (DISPLAY_SIZE, DISPLAY_SIZE) and change.mode == "RGB"


def test_there_is_no_change_map_without_a_prior(predictor, studies):
    pair = make_pair("pair", read_study_file(studies[0]), None, "abnormality")
    answer, change = ask_showing_change(predictor, pair)
    assert change is None and answer.prediction == predictor.ask(pair).prediction


def test_there_is_no_change_map_from_a_fusion_without_a_difference_branch(trained_checkpoint, tiny_base, studies):
    concat = Predictor(trained_checkpoint, "cpu")
    # The same base, so the collator's visual token counts fit; concat shows the prior's own tokens.
    concat.module.model = build_model(ModelConfig(base=str(tiny_base), fusion=FusionConfig(mode="concat")))
    current, prior, days = studies
    pair = make_pair("pair", read_study_file(current), read_study_file(prior), "difference", interval_days=days)
    answer, change = ask_showing_change(concat, pair)
    assert change is None and answer.prediction == concat.ask(pair).prediction
