"""Vision towers: images in, patch tokens of one chosen layer out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

import timm
import torch
from torch import nn


@dataclass(frozen=True)
class VisionSpec:
    """What the data side must know about a tower without building it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]  # patch tokens per side (rows, columns)


def read_timm_spec(tower_dir: str | Path) -> VisionSpec:
    """Reads a timm ``local-dir`` tower's ``config.json`` (architecture, model_args, pretrained_cfg)."""
    tower_dir = Path(tower_dir)
    if not (tower_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no vision tower at {tower_dir}: expected a timm directory with config.json and "
            "model.safetensors (timm.models.save_for_hf writes one)"
        )
    config = json.loads((tower_dir / "config.json").read_text())
    pretrained_cfg, model_args = config["pretrained_cfg"], config.get("model_args", {})
    _, height, width = pretrained_cfg["input_size"]
    if height != width:
        raise ValueError(f"{tower_dir}/config.json: non-square input_size {height}x{width} is not supported")
    patch = model_args.get("patch_size", 16)
    return VisionSpec(
        image_size=height,
        mean=tuple(pretrained_cfg["mean"]),
        std=tuple(pretrained_cfg["std"]),
        grid=(height // patch, width // patch),
    )


class TimmVisionTower(nn.Module):
    """Any timm ViT-style model; returns the patch tokens (no CLS/register tokens) of ``layer``.

    ``layer`` counts like a Python index over the transformer blocks: NVILA takes SigLIP's
    second-to-last layer (-2); a tiny 2-block tower is better read at its last block (-1). The blocks
    after it are dropped, so the output is always that of the (new) last block.
    """

    def __init__(self, model: nn.Module, layer: int = -2):
        super().__init__()
        self.model = model
        self.grid = tuple(model.patch_embed.grid_size)
        self.hidden_size = model.embed_dim
        # Blocks after the chosen layer never contribute; dropping them saves compute and keeps
        # every remaining parameter in the graph (FSDP/DDP require that).
        depth = len(model.blocks)
        keep = layer % depth + 1
        model.blocks = model.blocks[:keep]
        # The pooled head is never used either.
        model.reset_classifier(0, "")
        model.norm = model.fc_norm = nn.Identity()

    @classmethod
    def from_dir(cls, tower_dir: str | Path, layer: int = -2, pretrained: bool = True) -> TimmVisionTower:
        read_timm_spec(tower_dir)  # precise error for a missing or malformed directory
        model = timm.create_model(f"local-dir:{Path(tower_dir).resolve()}", pretrained=pretrained)
        return cls(model, layer)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        return self.model.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, grid_h * grid_w, C) patch tokens of the chosen layer."""
        (tokens,) = self.model.forward_intermediates(
            images, indices=[-1], norm=False, output_fmt="NLC", intermediates_only=True
        )
        return tokens
