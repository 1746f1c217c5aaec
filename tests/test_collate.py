"""The collator: chat template, <image> expansion, label mask, padding, image transform."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from common.contract import IGNORE_INDEX
from datamodules.collate import LoadedSample, LumenCollator, image_transform
from datamodules.datamodule import SampleDataset
from datamodules.records import Sample
from models.config import ModelConfig
from models.factory import input_spec

DIAGNOSTIC = Sample("d-1", "diagnostic", "presence", "is there pleural effusion?", "yes", image="cur.jpg")
DIFFERENCE = Sample(
    "d-2", "difference", "difference", "what has changed compared to the reference image?",
    "the main image has an additional finding of pneumothorax than the reference image.",
    image="cur.jpg", prior_image="prior.jpg", interval_days=42.0,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base / "llm")


@pytest.fixture(scope="module")
def spec(tiny_base):
    return input_spec(ModelConfig(base=str(tiny_base)))


def image(value: int = 128, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.full(size, value, dtype=np.uint8))


def loaded(sample: Sample) -> LoadedSample:
    return LoadedSample(sample, image(), image(64) if sample.has_prior else None)


@pytest.mark.parametrize(("mode", "slots"), [("concat", 2), ("difference", 2), ("fused", 1)])
def test_each_image_token_is_expanded_to_the_visual_token_count(tokenizer, spec, mode, slots):
    batch = LumenCollator(tokenizer, **spec | {"fusion_mode": mode})([loaded(DIAGNOSTIC), loaded(DIFFERENCE)])
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    counts = (batch["input_ids"] == image_token_id).sum(dim=1).tolist()
    assert counts == [spec["tokens_per_image"], slots * spec["tokens_per_image"]]


def test_labels_cover_only_the_answer_and_its_end_token(tokenizer, spec):
    batch = LumenCollator(tokenizer, **spec)([loaded(DIAGNOSTIC), loaded(DIFFERENCE)])
    for row, sample in enumerate([DIAGNOSTIC, DIFFERENCE]):
        learned = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(learned) == sample.answer + "<|im_end|>"
        # Every learned position holds the token it teaches.
        positions = batch["labels"][row] != IGNORE_INDEX
        assert torch.equal(batch["input_ids"][row][positions], learned)


def test_prompt_follows_chatml_with_prior_first_and_the_interval(tokenizer, spec):
    batch = LumenCollator(tokenizer, **spec | {"fusion_mode": "concat"})([loaded(DIFFERENCE)])
    text = tokenizer.decode(batch["input_ids"][0]).replace("<image>" * spec["tokens_per_image"], "<image>")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        "Image-1 (prior study): <image>\nImage-2 (current study): <image>\n"
        "The prior study was taken 42 days earlier.\n"
        "what has changed compared to the reference image?<|im_end|>\n<|im_start|>assistant\n"
        + DIFFERENCE.answer + "<|im_end|>"
    )


def test_fused_prompt_names_its_one_image_slot(tokenizer, spec):
    batch = LumenCollator(tokenizer, **spec | {"fusion_mode": "fused"}, for_generation=True)([loaded(DIFFERENCE)])
    text = tokenizer.decode(batch["input_ids"][0]).replace("<image>" * spec["tokens_per_image"], "<image>")
    assert "user\nCurrent study, compared with the prior study: <image>\nThe prior study was taken 42 days" in text


def test_unknown_fusion_mode_is_a_clear_error(tokenizer, spec):
    with pytest.raises(ValueError, match="fusion_mode='stacked'"):
        LumenCollator(tokenizer, **spec | {"fusion_mode": "stacked"})


def test_interval_text_can_be_switched_off(tokenizer, spec):
    batch = LumenCollator(tokenizer, **spec, interval_in_prompt=False)([loaded(DIFFERENCE)])
    assert "days earlier" not in tokenizer.decode(batch["input_ids"][0])


def test_training_batches_are_right_padded_and_generation_batches_left_padded(tokenizer, spec):
    samples = [loaded(DIAGNOSTIC), loaded(DIFFERENCE)]
    train = LumenCollator(tokenizer, **spec)(samples)
    generate = LumenCollator(tokenizer, **spec, for_generation=True)(samples)
    assert train["attention_mask"][0, 0] == 1 and train["attention_mask"][0, -1] == 0
    assert generate["attention_mask"][0, 0] == 0 and generate["attention_mask"][0, -1] == 1
    assert "labels" not in generate
    prompt = tokenizer.decode(generate["input_ids"][0][generate["attention_mask"][0].bool()])
    assert prompt.endswith("<|im_start|>assistant\n") and DIAGNOSTIC.answer not in prompt.split("assistant")[-1]


def test_image_tensors_follow_has_prior_and_interval(tokenizer, spec):
    batch = LumenCollator(tokenizer, **spec)([loaded(DIAGNOSTIC), loaded(DIFFERENCE)])
    size = spec["image_size"]
    assert batch["current_images"].shape == (2, 3, size, size)
    assert batch["prior_images"].shape == (1, 3, size, size)
    assert batch["has_prior"].tolist() == [False, True]
    assert batch["interval_days"].tolist() == [0.0, 42.0]


def test_image_transform_pads_to_square_and_normalises():
    tall = Image.fromarray(np.full((40, 20), 255, dtype=np.uint8))
    pixels = image_transform(tall, 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert pixels.shape == (3, 8, 8)
    # White image in the middle columns (-> 1.0), mean-grey padding at the sides (-> 0.0).
    assert pixels[:, :, 3:5].min() > 0.9
    assert pixels[:, :, 0].abs().max() < 0.05


def test_missing_image_names_the_sample_field_and_path(tmp_path):
    missing = tmp_path / "files" / "p10" / "p10000001" / "s50000001" / "nope.jpg"
    sample = Sample("diffvqa-7", "diagnostic", "view", "which view is this image taken?", "PA view", image=missing)
    with pytest.raises(FileNotFoundError, match=rf"sample diffvqa-7, field image: image not found: {missing}"):
        SampleDataset([sample])[0]


def test_corrupt_image_names_the_sample_and_path(tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"not a jpeg")
    sample = Sample("diffvqa-8", "difference", "difference", "what has changed?", "nothing has changed.",
                    image=corrupt, prior_image=corrupt, interval_days=3.0)
    with pytest.raises(OSError, match=rf"sample diffvqa-8, field prior_image: cannot read image {corrupt}"):
        SampleDataset([sample])[0]


@pytest.mark.parametrize("resize", ["pad", "squash", "crop"])
def test_a_grayscale_image_becomes_exactly_what_its_rgb_copy_becomes(resize):
    """Grayscale images are resized before they are copied to three channels: no pixel may change."""
    rows, columns = np.mgrid[0:37, 0:53]
    gray = Image.fromarray(((rows * 7 + columns * 3) % 256).astype(np.uint8), mode="L")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # unequal channels: the pad colour differs per channel
    assert torch.equal(image_transform(gray, 16, mean, std, resize), image_transform(gray.convert("RGB"), 16, mean, std, resize))
