"""Building a LumenModel from a base-model directory, and loading our Lightning checkpoints.

A base directory is laid out like NVILA's: ``llm/`` (a Hugging Face causal LM + its tokenizer) and
``vision_tower/`` (here a timm ``local-dir`` tower). The projector and the temporal fusion are new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.lumen import LumenModel
from models.projector import MLPDownsampleProjector, TemporalFusion
from models.tiny import IMAGE_TOKEN
from models.vision import TimmVisionTower, read_timm_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.net`` config group."""

    base: str
    vision_layer: int = -2
    fusion_heads: int = 1
    interval_embedding: bool = True
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.net.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"model.net.attn_implementation={self.attn_implementation!r}: expected one of {ATTENTION}")

    @property
    def llm_dir(self) -> Path:
        return _require_dir(Path(self.base) / "llm", "a Hugging Face causal LM (config.json, weights, tokenizer)")

    @property
    def vision_dir(self) -> Path:
        return _require_dir(Path(self.base) / "vision_tower", "a vision tower (config.json, model.safetensors)")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: model.net.base must point to a base-model directory with {path.name}/ "
            f"holding {what}. Set model.net.base=<dir> (the demo builds a tiny one automatically)."
        )
    return path


def input_spec(config: ModelConfig) -> dict[str, Any]:
    """What the collator must know: image size and normalisation, visual tokens per image."""
    vision = read_timm_spec(config.vision_dir)
    return {
        "image_size": vision.image_size,
        "mean": list(vision.mean),
        "std": list(vision.std),
        "tokens_per_image": (vision.grid[0] // 2) * (vision.grid[1] // 2),
        "image_token": IMAGE_TOKEN,
    }


def load_tokenizer(config: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(config.llm_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer in {config.llm_dir} has no {IMAGE_TOKEN} special token")
    return tokenizer


def build_model(config: ModelConfig) -> LumenModel:
    """Loads the pretrained towers from ``config.base``; projector and fusion start fresh."""
    dtype = DTYPES[config.dtype]
    if config.attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "model.net.attn_implementation=flash_attention_2 needs the flash-attn package "
                "(pip install -e '.[gpu]' on a CUDA machine); use sdpa on CPU"
            ) from error
    llm = AutoModelForCausalLM.from_pretrained(
        config.llm_dir, dtype=dtype, attn_implementation=config.attn_implementation
    )
    if config.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision = TimmVisionTower.from_dir(config.vision_dir, layer=config.vision_layer).to(dtype)
    llm_size = llm.config.hidden_size
    projector = MLPDownsampleProjector(vision.grid, vision.hidden_size, llm_size).to(dtype)
    fusion = TemporalFusion(
        llm_size, projector.tokens_per_image, heads=config.fusion_heads, use_interval=config.interval_embedding
    ).to(dtype)
    image_token_id = load_tokenizer(config).convert_tokens_to_ids(IMAGE_TOKEN)
    return LumenModel(vision, projector, fusion, llm, image_token_id)
