"""Sizes, inputs and commands shared by the tests."""

import json
import subprocess
import sys
from pathlib import Path

import torch

# Small enough to build in seconds, big enough for a few batches of every question type.
WORLD_SUBJECTS = 16
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64}
TINY_LLM = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64}
TINY_PRETRAIN_STEPS = 5


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def model_inputs(model, has_prior=(True, False)) -> dict:
    """A right-padded two-sample batch whose image tokens match the model's layout."""
    generator = torch.Generator().manual_seed(0)
    rows = [[100] * 5 + [model.image_token_id] * ((model.fusion.slots if prior else 1) * model.tokens_per_image) + [101, 102]
            for prior in has_prior]
    longest = max(map(len, rows))
    size = model.vision.grid[0] * 8
    return {
        "input_ids": torch.tensor([row + [0] * (longest - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in rows]),
        "current_images": torch.randn(len(rows), 3, size, size, generator=generator),
        "prior_images": torch.randn(sum(has_prior), 3, size, size, generator=generator),
        "has_prior": torch.tensor(has_prior),
        "interval_days": torch.tensor([45.0 if prior else 0.0 for prior in has_prior]),
    }


def model_labels(model, batch: dict) -> torch.Tensor:
    """Next-token labels for ``model_inputs``: every text token, no image token."""
    return batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, -100)


def checkpoints_cli(*args: object) -> None:
    """Runs ``python -m models.checkpoints ARGS`` from the repository root, as a user would."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "models.checkpoints", *map(str, args)], cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
