"""The collator: the one place where text becomes token ids and images become tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from common.contract import DEFAULT_RESIZE, IGNORE_INDEX, IMAGE_SLOTS, IMAGE_TOKEN, RESIZE_POLICIES
from datamodules.records import Sample


@dataclass(frozen=True)
class LoadedSample:
    """A sample with its images read from disk (by the dataset, in a worker)."""

    sample: Sample
    image: Image.Image
    prior_image: Image.Image | None


def image_transform(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float],
                    resize: str = "pad") -> torch.Tensor:
    """Grayscale to 3 channels, a square of ``size`` px by the ``resize`` policy, normalised:
    PIL -> (3, size, size). A grayscale image is resized before it is copied to three channels: the
    same pixels for a third of the work."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_POLICIES}")
    image = image if image.mode == "L" else image.convert("RGB")
    if resize == "pad":
        fill = tuple(round(255 * m) for m in mean)
        contained = ImageOps.contain(image, (size, size), method=Image.Resampling.BICUBIC).convert("RGB")
        square = ImageOps.pad(contained, (size, size), method=Image.Resampling.BICUBIC, color=fill)
    elif resize == "squash":
        square = image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    else:
        square = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC).convert("RGB")
    return F.normalize(F.to_dtype(F.pil_to_tensor(square), torch.float32, scale=True), list(mean), list(std))


CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def user_prompt(sample: Sample, image_token: str, interval_in_prompt: bool, fusion_mode: str) -> str:
    """The one user turn, in this order: the images (first, as NVILA and MMXU do; each followed by
    a newline, as in NVILA), the interval, the expert predictions, the prior study's history, the
    question, and a single-choice question's options with MMXU's instruction."""
    if sample.has_prior:
        lines = [f"{slot}: {image_token}" for slot in IMAGE_SLOTS[fusion_mode]]
        if interval_in_prompt:
            lines.append(f"The prior study was taken {sample.interval_days:g} days earlier.")
    else:
        lines = [image_token]
    lines += [text for text in (sample.expert, sample.history) if text]
    lines.append(sample.question)
    if sample.options:
        lines += [f"{letter}. {text}" for letter, text in sample.options.items()]
        lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)


class LumenCollator:
    """Samples -> a batch for ``LumenModel``.

    Each ``<image>`` becomes ``tokens_per_image`` copies of the image token, so sequence lengths are
    final here and the model only copies its visual tokens to them. Training batches have labels on the
    assistant answer and its ``<|im_end|>`` only, and are either right-padded, (B, L), or with
    ``packing`` one row of the samples laid end to end, (1, total), with ``position_ids`` restarting at 0
    per sample, ``cu_seq_lens`` (the samples' boundaries, (B + 1,) int32) from which the model builds
    block-causal attention, and ``max_length`` (the longest sample, an int). Generation batches are
    left-padded prompts ending in the assistant header.

    ``resize`` is the image policy (``RESIZE_POLICIES``), ``None`` meaning ``DEFAULT_RESIZE``: an
    ``InputSpec`` spread into the arguments brings the base's own policy, or ``None`` if it has none.
    """

    def __init__(
        self,
        tokenizer,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        tokens_per_image: int,
        fusion_mode: str,
        image_token: str = IMAGE_TOKEN,
        interval_in_prompt: bool = True,
        resize: str | None = None,
        for_generation: bool = False,
        packing: bool = False,
    ):
        if packing and for_generation:
            raise ValueError("packing is for training and validation-loss batches; generation batches are left-padded")
        if fusion_mode not in IMAGE_SLOTS:
            raise ValueError(f"fusion_mode={fusion_mode!r}: expected one of {sorted(IMAGE_SLOTS)}")
        resize = resize or DEFAULT_RESIZE
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"image_resize={resize!r}: expected one of {RESIZE_POLICIES}")
        self.resize = resize
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.tokens_per_image = tokens_per_image
        self.image_token = image_token
        self.interval_in_prompt = interval_in_prompt
        self.fusion_mode = fusion_mode
        self.for_generation = for_generation
        self.packing = packing
        self.end_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")

    @property
    def slots(self) -> tuple[str, ...]:
        """The image slots a two-image prompt shows."""
        return IMAGE_SLOTS[self.fusion_mode]

    def chat_text(self, sample: Sample) -> str:
        """The chat-formatted prompt of one sample, each image shown as one image token (``tokenize``
        gives each its ``tokens_per_image``)."""
        prompt = user_prompt(sample, self.image_token, self.interval_in_prompt, self.fusion_mode)
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def tokenize(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Returns (input ids, labels) for one sample; labels are empty for generation."""
        text = self.chat_text(sample).replace(self.image_token, self.image_token * self.tokens_per_image)
        prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.for_generation:
            return prompt_ids, []
        answer_ids = self.tokenizer(sample.answer, add_special_tokens=False).input_ids + [self.end_token_id]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    def pad(self, tokenized: list[tuple[list[int], list[int]]]) -> dict:
        """(B, L) rows, right-padded for training, left-padded for generation."""
        longest = max(len(ids) for ids, _ in tokenized)
        input_ids = torch.full((len(tokenized), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(tokenized), longest), dtype=torch.long)
        labels = torch.full((len(tokenized), longest), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, target) in enumerate(tokenized):
            # Generation continues from the last prompt token, so prompts are left-padded.
            span = slice(longest - len(ids), longest) if self.for_generation else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            attention_mask[row, span] = 1
            if target:
                labels[row, span] = torch.tensor(target)
        text = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not self.for_generation:
            text["labels"] = labels
        return text

    def pack(self, tokenized: list[tuple[list[int], list[int]]]) -> dict:
        """One (1, total) row: the samples end to end, no padding."""
        lengths = torch.tensor([len(ids) for ids, _ in tokenized])
        starts = lengths.cumsum(0) - lengths
        labels = torch.cat([torch.tensor(target) for _, target in tokenized])
        # The loss shifts labels by one, so a sample's last token would learn the next sample's first
        # token: ignore it, as padding is ignored in a padded row (it is a prompt token, ignored anyway).
        labels[starts] = IGNORE_INDEX
        return {
            "input_ids": torch.cat([torch.tensor(ids) for ids, _ in tokenized])[None],
            # Every token is real; which tokens see which is cu_seq_lens's business.
            "attention_mask": torch.ones(1, int(lengths.sum()), dtype=torch.long),
            "labels": labels[None],
            "position_ids": torch.cat([torch.arange(length) for length in lengths.tolist()])[None],
            "cu_seq_lens": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
            # The longest sample, a Python int: flash-attention's varlen kernel takes it from the host, and
            # the model reading it from cu_seq_lens on the GPU would wait for the device.
            "max_length": int(lengths.max()),
        }

    def __call__(self, batch: list[LoadedSample]) -> dict:
        tokenized = [self.tokenize(item.sample) for item in batch]
        text = self.pack(tokenized) if self.packing else self.pad(tokenized)

        def pixels(image: Image.Image) -> torch.Tensor:
            return image_transform(image, self.image_size, self.mean, self.std, self.resize)

        priors = [pixels(item.prior_image) for item in batch if item.prior_image is not None]
        return {
            **text,
            "current_images": torch.stack([pixels(item.image) for item in batch]),
            "prior_images": torch.stack(priors) if priors else torch.zeros(0, 3, self.image_size, self.image_size),
            "has_prior": torch.tensor([item.sample.has_prior for item in batch]),
            "interval_days": torch.tensor([item.sample.interval_days or 0.0 for item in batch]),
            "sample_ids": [item.sample.sample_id for item in batch],
        }
