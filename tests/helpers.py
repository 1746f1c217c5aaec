"""Sizes, inputs and commands shared by the tests."""

import json
import subprocess
import sys
from pathlib import Path

import torch

# Small enough to build in seconds, big enough for a few batches of every question type.
WORLD_SUBJECTS = 16
# The train config without the demo's recipe (configs/experiment/demo.yaml): its single Medical-Diff-VQA
# source, for one epoch. Tests that count steps or samples say so, so that the demo can change its recipe.
PLAIN = ("data=diffvqa", "trainer.max_epochs=1")
TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64}
TINY_LLM = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64}
TINY_PRETRAIN_STEPS = 5

# Two float32 computations of the same quantity whose sums run in other orders (another layout, kernel,
# thread count or CPU) differ by rounding alone. One rounding is off by at most u = 2^-24, so two orders of
# an n-term sum differ by at most 2·n·u times the sum of the terms' magnitudes (Higham, "Accuracy and
# Stability of Numerical Algorithms", 2nd ed., §4.2). The tiny models' longest reductions (a weight's
# gradient over a batch's tokens, a hidden dimension) have n ≤ 512 terms: 2·512·u ≈ 6e-5.
FLOAT32_ROUNDOFF = 2.0 ** -24
SUMMATION_ORDER_TOLERANCE = 2 * 512 * FLOAT32_ROUNDOFF


def relative_difference(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """‖actual − expected‖ / ‖expected‖ over the whole tensor, or over ``scale`` when given."""
    difference = float((actual.double() - expected.double()).norm())
    scale = float(expected.double().norm()) if scale is None else scale
    return difference / scale if scale > 0 else difference


def assert_same_up_to_summation_order(actual: dict[str, torch.Tensor | None] | torch.Tensor,
                                      expected: dict[str, torch.Tensor | None] | torch.Tensor) -> None:
    """``actual`` equals ``expected`` (a tensor, or tensors by name such as a model's gradients) up to the
    rounding of sums taken in another order: within ``SUMMATION_ORDER_TOLERANCE`` of its scale.

    A tensor is compared as a whole, by its norm. Element by element, a near-cancelling entry (a small
    gradient made of large terms of both signs) carries the rounding error of its terms, not of itself,
    and no tolerance relative to the entry holds on every CPU. For the same reason a tensor's scale is never
    below the whole set's root-mean-square per element: a key projection's bias, for one, has a gradient of
    exactly zero in exact arithmetic (softmax ignores a shift shared by every key), so what is computed is
    rounding noise of terms the size of the other gradients. A real difference (a token dropped from the
    loss) moves a tensor by orders of magnitude more (tests/test_packing.py checks one)."""
    if isinstance(expected, torch.Tensor):
        actual, expected = {"tensor": actual}, {"tensor": expected}
    assert actual.keys() == expected.keys()
    absent = [name for name in expected if (actual[name] is None) != (expected[name] is None)]
    assert not absent, f"a gradient on one side only: {absent}"
    present = {name: tensor.double() for name, tensor in expected.items() if tensor is not None}
    elements = sum(tensor.numel() for tensor in present.values())
    mean_square = sum(float(tensor.square().sum()) for tensor in present.values()) / max(elements, 1)
    off = {}
    for name, tensor in present.items():
        scale = max(float(tensor.norm()), (mean_square * tensor.numel()) ** 0.5)
        difference = relative_difference(actual[name], tensor, scale)
        if difference > SUMMATION_ORDER_TOLERANCE:
            off[name] = difference
    assert not off, f"relative differences above {SUMMATION_ORDER_TOLERANCE:.1e}: {off}"


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
