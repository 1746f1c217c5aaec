"""The contract between the prompt and the model, defined once: the collator writes prompts by it and
the model reads them by it.

- ``IGNORE_INDEX``: the label of a token the loss skips (prompt, padding, a packed row's seams);
- ``IMAGE_TOKEN``: NVILA's image placeholder, expanded by the collator to the visual token count and
  overwritten by the model with the visual tokens;
- ``IMAGE_SLOTS``: the image slots of a two-image prompt per fusion mode, so also how many token sets
  the fusion hands the LLM for a sample with a prior (a sample without one always shows one set);
- ``RESIZE_POLICIES``: how an image becomes the tower's square, which a base may prescribe;
- ``InputSpec``: what the collator must know of a model to lay out its prompts and images.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"

# What each image slot of a two-image prompt holds, per fusion mode (models.fusion.TemporalFusion):
# the context set (prior or difference tokens) comes first, the current study last.
IMAGE_SLOTS = {
    "concat": ("Image-1 (prior study)", "Image-2 (current study)"),
    "difference": ("Change since the prior study", "Current study"),
    "fused": ("Current study, compared with the prior study",),
}
FUSION_MODES = tuple(IMAGE_SLOTS)

# How an image becomes a square: pad (keeps all anatomy and the aspect ratio), squash (stretched, as
# SigLIP's processor and NVILA do) or crop (the centre square, as torchxrayvision does). A base that
# does not prescribe one gets DEFAULT_RESIZE.
RESIZE_POLICIES = ("pad", "squash", "crop")
DEFAULT_RESIZE = "pad"


@dataclass(frozen=True)
class InputSpec:
    """What the collator must know of the model (``models.factory.input_spec`` reads it from the base
    directory): image size and normalisation, visual tokens per image, the image token, the fusion
    mode, which sets how many token sets a two-image sample shows (``IMAGE_SLOTS``), and the resize
    policy the base was trained with (``None`` when the base does not say; an NVILA base does).

    It also reads as a mapping of these fields, so ``**spec`` fills the collator's keyword arguments, and
    ``spec | {"fusion_mode": "fused"}`` is a copy with a field changed, as with a dict."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokens_per_image: int
    fusion_mode: str
    image_token: str = IMAGE_TOKEN
    resize: str | None = None

    def __post_init__(self) -> None:
        if self.resize is not None and self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize={self.resize!r}: expected one of {RESIZE_POLICIES} or None")
        # Plain tuples also when built from a config's lists.
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))

    def keys(self) -> Iterator[str]:
        return (field.name for field in fields(self))

    def __getitem__(self, key: str) -> Any:
        if key not in set(self.keys()):
            raise KeyError(key)
        return getattr(self, key)

    def __or__(self, changes: Mapping[str, Any]) -> InputSpec:
        return replace(self, **changes)
