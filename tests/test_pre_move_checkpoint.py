"""Checkpoints and exports written before the layering move (issue 18) load and compute what they did.

``tests/data/pre_move`` was written by the code of commit 558f307 (its README holds the script): a
weights-only training checkpoint, its export and the logits the checkpoint computed on fixed inputs.
Nothing a checkpoint or an export stores names a module of ours (the model config is plain values, the
sources and the exported architecture are class names), so nothing maps old paths to new ones: these
tests are what would fail if that changed.
"""

import json
from pathlib import Path

import pytest
import torch

from models.checkpoints import load_checkpoint
from tests.helpers import model_inputs

ROOT = Path(__file__).resolve().parents[1]
PRE_MOVE = Path("tests/data/pre_move")  # the checkpoint names its base relative to the repository root


@pytest.fixture
def in_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((ROOT / PRE_MOVE / "expected.json").read_text())


@pytest.mark.parametrize("written", ["last.ckpt", "export"])
def test_a_pre_move_checkpoint_or_export_computes_the_logits_it_computed_then(written, in_repository_root, expected):
    loaded = load_checkpoint(PRE_MOVE / written)
    inputs = torch.load(PRE_MOVE / "inputs.pt", weights_only=True)
    assert model_inputs(loaded.model).keys() == inputs.keys()
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    torch.testing.assert_close(logits, torch.load(PRE_MOVE / "logits.pt", weights_only=True), rtol=1e-5, atol=1e-5)
    assert list(logits.shape) == expected["shape"]
    assert loaded.model.tokens_per_image == expected["tokens_per_image"]
    assert loaded.model.fusion.mode == expected["fusion_mode"]
    assert loaded.max_new_tokens == expected["max_new_tokens"]


def test_a_pre_move_checkpoint_keeps_how_it_was_prompted(in_repository_root, expected):
    assert load_checkpoint(PRE_MOVE / "last.ckpt").prompt == expected["prompt"]
