"""The model's configuration (the ``model.net`` config group): plain values, checked when constructed,
and the paths of a base directory's parts. Reading the base directory is ``models.factory``'s job."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.contract import FUSION_MODES
from models.projector import PROJECTOR_TYPES
from models.vision import TOWER_TYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("eager", "sdpa", "flash_attention_2")
# The layer a tower is read at when neither the config nor the base says: SigLIP's second-to-last, NVILA's.
DEFAULT_VISION_LAYER = -2
# The manifest of a tiny base built by run.tiny_base: what it was built from, and the layer its tower is
# read at ("vision_layer"), which model.net.vision.layer=null follows. A manifest written before that key
# existed names the tower's family ("vision_tower"; none: siglip), whose layer is this one.
BASE_MANIFEST = "lumen-base.json"
TINY_BASE_LAYERS = {"resnet": 2, "siglip": -1}


@dataclass(frozen=True)
class VisionConfig:
    """The ``model/vision`` config group."""

    # None: the family of the base's vision_tower/, read from its files (models.vision.tower_type_of).
    type: str | None = None
    # None: the layer the base prescribes -- an NVILA base's mm_vision_select_layer (models.nvila), a tiny
    # base's vision_layer (BASE_MANIFEST) -- else DEFAULT_VISION_LAYER. A layer that differs from an NVILA
    # base's is refused: its projector was trained on that layer's tokens.
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in TOWER_TYPES:
            raise ValueError(f"model.net.vision.type={self.type!r}: expected one of {TOWER_TYPES} or null (the base's)")


@dataclass(frozen=True)
class FusionConfig:
    mode: str = "difference"
    heads: int = 1
    interval_embedding: bool = True  # the interval as an embedding; as text it is data.interval_in_prompt

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"model.net.fusion.mode={self.mode!r}: expected one of {FUSION_MODES}")


@dataclass(frozen=True)
class ModelConfig:
    """The ``model.net`` config group."""

    base: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: str | None = None  # None: the base's mm_projector type, else mlp_downsample
    fusion: FusionConfig = field(default_factory=FusionConfig)
    tune_vision: bool = True  # the demo's config (configs/model/lumen.yaml) freezes its tiny tower
    tune_projector: bool = True  # the projector and the temporal fusion
    tune_llm: bool = True
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Hydra hands the nested groups over as dicts.
        for name, kind in (("vision", VisionConfig), ("fusion", FusionConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                object.__setattr__(self, name, kind(**value))
        if self.dtype not in DTYPES:
            raise ValueError(f"model.net.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.attn_implementation not in ATTENTION:
            raise ValueError(f"model.net.attn_implementation={self.attn_implementation!r}: expected one of {ATTENTION}")
        if self.projector is not None and self.projector not in PROJECTOR_TYPES:
            raise ValueError(f"model.net.projector={self.projector!r}: expected one of {PROJECTOR_TYPES} or null")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Where the base directory keeps each part (``models.factory`` checks that they are there).
    @property
    def llm_dir(self) -> Path:
        return Path(self.base) / "llm"

    @property
    def vision_dir(self) -> Path:
        return Path(self.base) / "vision_tower"

    @property
    def manifest_path(self) -> Path:
        return Path(self.base) / BASE_MANIFEST

    @property
    def projector_dir(self) -> Path:
        return Path(self.base) / "mm_projector"

    @property
    def fusion_dir(self) -> Path:
        return Path(self.base) / "temporal_fusion"
