"""Vision-to-LLM projection: NVILA's token-merging MLP projectors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TokenMerge(nn.Module):
    """Concatenates each ``k x k`` block of neighbouring tokens, in NVILA's channel order.

    For k = 2, token (i, j) becomes [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)] -- einops
    ``b (h k) (w k) c -> b h w (k k c)``, which is not ``pixel_unshuffle`` order. A grid that is not a
    multiple of k is zero-padded at the bottom and right, as NVILA does.
    """

    def __init__(self, grid: tuple[int, int], k: int):
        super().__init__()
        self.grid, self.k = grid, k
        self.out_grid = (math.ceil(grid[0] / k), math.ceil(grid[1] / k))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, channels = tokens.shape
        (rows, cols), k = self.grid, self.k
        grid = tokens.view(batch, rows, cols, channels)
        out_rows, out_cols = self.out_grid
        grid = F.pad(grid, (0, 0, 0, out_cols * k - cols, 0, out_rows * k - rows))
        # (B, R, C, ch) -> (B, R/k, k, C/k, k, ch) -> (B, R/k, C/k, k, k, ch)
        blocks = grid.view(batch, out_rows, k, out_cols, k, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(batch, out_rows * out_cols, k * k * channels)  # -> (B, N/k^2, k^2 ch)


# Projector type -> side of the square block of tokens it merges into one.
MERGE_SIZE = {"mlp_downsample": 2, "mlp_downsample_3x3_fix": 3}
PROJECTOR_TYPES = tuple(MERGE_SIZE)


def tokens_per_image(grid: tuple[int, int], projector_type: str) -> int:
    """Visual tokens a projector makes of a ``grid`` of patch tokens (without building it)."""
    rows, cols = TokenMerge(grid, MERGE_SIZE[projector_type]).out_grid
    return rows * cols


class MLPDownsampleProjector(nn.Module):
    """NVILA's ``mm_projector``, weight-compatible (one ``nn.Sequential`` named ``layers``):

    - ``mlp_downsample`` (NVILA-8B): 2x2 merge, LayerNorm(4C), Linear(4C->D), GELU, Linear(D->D);
      keys ``layers.1``, ``layers.2``, ``layers.4``;
    - ``mlp_downsample_3x3_fix`` (NVILA-Lite): 3x3 merge, LayerNorm(9C), Linear(9C->3C), GELU,
      LayerNorm(3C), Linear(3C->D), GELU, Linear(D->D); keys ``layers.1, 2, 4, 5, 7``.

    ``scales``: NVILA-8B concatenates three image scales on channels (its ``mm_hidden_size`` is 3x the
    tower's); for an image it does not tile, as with multi-image prompts, it repeats the single-scale
    features once per scale. ``scales=3`` reproduces that, so its projector weights apply unchanged.
    """

    def __init__(self, grid: tuple[int, int], vision_size: int, llm_size: int,
                 projector_type: str = "mlp_downsample", scales: int = 1):
        super().__init__()
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector type {projector_type!r}: expected one of {PROJECTOR_TYPES}")
        self.projector_type, self.scales = projector_type, scales
        channels = vision_size * scales
        merge = TokenMerge(grid, MERGE_SIZE[projector_type])
        if projector_type == "mlp_downsample":
            layers = [merge, nn.LayerNorm(4 * channels), nn.Linear(4 * channels, llm_size), nn.GELU(),
                      nn.Linear(llm_size, llm_size)]
        else:
            layers = [merge, nn.LayerNorm(9 * channels), nn.Linear(9 * channels, 3 * channels), nn.GELU(),
                      nn.LayerNorm(3 * channels), nn.Linear(3 * channels, llm_size), nn.GELU(),
                      nn.Linear(llm_size, llm_size)]
        self.layers = nn.Sequential(*layers)
        self.tokens_per_image = merge.out_grid[0] * merge.out_grid[1]
        self.mm_hidden_size = channels

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, rows*cols, C) -> (B, tokens_per_image, D)."""
        return self.layers(patch_tokens.repeat(1, 1, self.scales) if self.scales > 1 else patch_tokens)
