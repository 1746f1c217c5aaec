"""Where the model sees change: the temporal fusion's difference tokens (``models.fusion``), their
magnitude per visual token drawn as a heat map over the current image as the model saw it.

The difference branch's MLP output is the change the fusion found between a current token and its prior
counterpart, before the interval's gate scales the whole set (a scale the normalisation removes). Each
visual token is one block of the projector's token merge (``models.projector.TokenMerge``): a
``k x k`` block of the tower's patch grid, row by row, the grid's bottom and right edges zero-padded to
a multiple of k. So token (i, j) covers patch rows ``i*k .. i*k + k`` and columns ``j*k .. j*k + k`` of
the square image the collator made.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from datamodules.collate import image_transform
from datamodules.datamodule import SampleDataset
from datamodules.pairs import Pair
from models.projector import TokenMerge
from run.predict import Answer, Predictor

OVERLAY_OPACITY = 0.6  # of the hottest token's colour; a cold token leaves the image as it is
# The image is made square at this size (or the model's, if larger) by the model's resize policy: the same
# geometry as the model's input, at a size a person can read however small that input is.
DISPLAY_SIZE = 512


def token_heat(magnitude: torch.Tensor, merge: TokenMerge, size: int) -> torch.Tensor:
    """(N,) magnitudes of the merged tokens -> (size, size) heat in [0, 1] over the square image."""
    (rows, cols), k = merge.grid, merge.k
    out_rows, out_cols = merge.out_grid
    if magnitude.numel() != out_rows * out_cols:
        raise ValueError(f"{magnitude.numel()} token magnitudes for a {out_rows} x {out_cols} token grid")
    low, high = magnitude.min(), magnitude.max()
    heat = (magnitude - low) / (high - low) if high > low else torch.zeros_like(magnitude)
    # (N,) -> (R/k, C/k) -> each token over its k x k patches -> the padded patches dropped: (R, C)
    patches = heat.view(out_rows, out_cols).repeat_interleave(k, 0).repeat_interleave(k, 1)[:rows, :cols]
    return F.interpolate(patches[None, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)[0, 0].clamp(0, 1)


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """A grayscale image with ``heat`` ((H, W) in [0, 1]) blended over it in the inferno colour map."""
    gray = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    values = heat.numpy()
    colour = colormaps["inferno"](values)[..., :3]
    alpha = OVERLAY_OPACITY * values[..., None]
    return Image.fromarray(np.uint8(255 * ((1 - alpha) * gray + alpha * colour)))


def seen_image(predictor: Predictor, answer: Answer) -> Image.Image:
    """The current image as the collator gave it to the model: read as the dataset reads it, made square
    by the checkpoint's resize policy (at ``DISPLAY_SIZE``), the normalisation undone."""
    collator = predictor.collator
    pixels = image_transform(SampleDataset([answer.sample])[0].image, max(collator.image_size, DISPLAY_SIZE),
                             collator.mean, collator.std, collator.resize)  # (3, S, S), normalised
    pixels = pixels * torch.tensor(collator.std)[:, None, None] + torch.tensor(collator.mean)[:, None, None]
    return Image.fromarray(np.uint8(255 * pixels.clamp(0, 1).permute(1, 2, 0).numpy()))


def ask_showing_change(predictor: Predictor, pair: Pair) -> tuple[Answer, Image.Image | None]:
    """The predictor's answer, and its current image overlaid with where the difference tokens are
    largest; None when the model computed no difference: no prior shown to it (none given, or a model
    trained without one) or a fusion without a difference branch (``concat``)."""
    branch = getattr(predictor.module.model.fusion, "difference_mlp", None)
    if branch is None:
        return predictor.ask(pair), None
    captured = []
    # The difference tokens are computed once per answer, when the prompt is embedded before decoding.
    handle = branch.register_forward_hook(lambda module, inputs, output: captured.append(output.detach()))
    try:
        answer = predictor.ask(pair)
    finally:
        handle.remove()
    if not answer.sample.has_prior:  # the branch ran on no samples: (0, N, D)
        return answer, None
    magnitude = captured[0][0].float().norm(dim=-1).cpu()  # (P=1, N, D) -> (N,)
    image = seen_image(predictor, answer)
    merge = predictor.module.model.projector.layers[0]
    return answer, overlay(image, token_heat(magnitude, merge, image.height))
