"""Vision towers: images in, patch tokens of one chosen layer out.

Three families behind one interface (``grid``, ``hidden_size``, ``forward(images) -> (B, N, C)``):

- ``hf``: a Hugging Face vision encoder directory -- ``SiglipVisionModel`` (NVILA's tower),
  ``Dinov2Model`` (RAD-DINO) or ``CLIPVisionModel``;
- ``timm``: any timm model with ``forward_intermediates``, from a ``local-dir`` directory
  (``config.json`` + ``model.safetensors``, as ``timm.models.save_for_hf`` writes);
- ``open_clip``: the image tower of an open_clip ``local-dir`` checkpoint (``open_clip_config.json``
  + weights, e.g. BiomedCLIP); the text tower is never built.

Every tower drops the layers after the chosen one (they never contribute, and FSDP/DDP want every
trainable parameter in the graph) and saves what remains in its own directory format, so a directory
written by ``export`` loads through the same path as the original checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

TOWER_TYPES = ("hf", "timm", "open_clip")
WEIGHTS = "model.safetensors"
TIMM_CONFIG = "a timm local-dir config, as timm.models.save_for_hf writes"


@dataclass(frozen=True)
class VisionSpec:
    """What the data side must know about a tower without building it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]  # patch tokens per side (rows, columns)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no vision tower at {path.parent}: expected {path.name} ({what})")
    return json.loads(path.read_text())


def _load_weights(module: nn.Module, tower_dir: Path, prefix: str = "") -> None:
    """Loads ``tower_dir``'s weights into ``module``: keys under ``prefix`` (others ignored); weights of
    pruned layers are skipped, missing ones are an error."""
    safetensors = [tower_dir / name for name in (WEIGHTS, "open_clip_model.safetensors")]
    path = next((p for p in safetensors if p.is_file()), tower_dir / "open_clip_pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"no weights in {tower_dir}: expected {WEIGHTS}")
    stored = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    expected = module.state_dict()
    weights = {}
    for key, value in stored.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key in expected:
            weights[key] = value
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise KeyError(f"{path}: no weights for {len(missing)} tensors of the tower, e.g. {missing[:3]}")
    module.load_state_dict(weights)


def _layer_index(layer: int, depth: int, source: Path) -> int:
    if not -depth <= layer < depth:
        raise ValueError(f"model.net.vision.layer={layer} is out of range for the {depth}-layer tower in {source}")
    return layer % depth


class HFVisionTower(nn.Module):
    """A Hugging Face vision encoder read at ``layer`` (NVILA: SigLIP's second-to-last, ``-2``), before
    its final norm; prefix tokens (CLS, registers) are dropped.

    The final norm and pooling head are never used; they stay in the module, frozen, so the tower saves
    as a complete checkpoint that ``from_pretrained`` reads back.
    """

    # model_type -> (attribute path of the layer list, final modules that are never used)
    LAYOUTS = {
        "siglip_vision_model": ("encoder.layers", ("post_layernorm", "head")),
        "clip_vision_model": ("encoder.layers", ("post_layernorm",)),
        "dinov2": ("encoder.layer", ("layernorm",)),
    }
    # model_type -> tokens before the patch tokens in a layer's output: SigLIP has no CLS token.
    PREFIX_TOKENS = {"siglip_vision_model": 0, "clip_vision_model": 1, "dinov2": 1}

    def __init__(self, model: nn.Module, layer: int, source: Path):
        super().__init__()
        config = model.config
        self.check_supported(config.model_type, source)
        layers_path, unused = self.LAYOUTS[config.model_type]
        parent_path, name = layers_path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        self.index = _layer_index(layer, len(getattr(parent, name)), source)
        keep = self.index + 1
        setattr(parent, name, getattr(parent, name)[:keep])
        # The config now describes the kept layers (backbone fields derived from the old depth go).
        kept = {k: v for k, v in config.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")}
        model.config = type(config).from_dict(kept | {"num_hidden_layers": keep})
        for attribute in unused:
            if hasattr(model, attribute):
                getattr(model, attribute).requires_grad_(False)
        self.model = model
        side = config.image_size // config.patch_size
        self.grid = (side, side)
        self.hidden_size = config.hidden_size

    @classmethod
    def check_supported(cls, model_type: str, source: Path) -> None:
        if model_type not in cls.LAYOUTS:
            raise ValueError(
                f"{source}/config.json: model_type {model_type!r} is not a supported Hugging Face vision "
                f"tower (supported: {sorted(cls.LAYOUTS)})"
            )

    @classmethod
    def from_dir(cls, tower_dir: str | Path, layer: int = -2, weights: bool = True) -> HFVisionTower:
        tower_dir = Path(tower_dir)
        _read_json(tower_dir / "config.json", "a Hugging Face vision model config")
        if weights:
            # from_pretrained also maps older key layouts (NVILA's tower was saved by transformers 4.x).
            model = AutoModel.from_pretrained(tower_dir, dtype=torch.float32)
        else:
            model = AutoModel.from_config(AutoConfig.from_pretrained(tower_dir))
        return cls(model, layer, tower_dir)

    @staticmethod
    def normalisation(tower_dir: Path) -> tuple[int, list[float], list[float]]:
        config = _read_json(tower_dir / "config.json", "a Hugging Face vision model config")
        preprocessor = tower_dir / "preprocessor_config.json"
        processor = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        # SigLIP normalises to [-1, 1]; that is also the default when no preprocessor file is kept.
        return config["image_size"], processor.get("image_mean", [0.5] * 3), processor.get("image_std", [0.5] * 3)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers (FSDP wraps each as one unit)."""
        parent_path, name = self.LAYOUTS[self.model.config.model_type][0].rsplit(".", 1)
        return getattr(self.model.get_submodule(parent_path), name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedded = self.model.embeddings(images)
        if hasattr(self.model, "pre_layrnorm"):  # CLIP normalises its embeddings before the encoder
            embedded = self.model.pre_layrnorm(embedded)
        hidden = self.model.encoder(embedded).last_hidden_state  # (B, prefix + N, C)
        return hidden[:, hidden.shape[1] - self.grid[0] * self.grid[1]:]

    def save(self, out: Path) -> None:
        self.model.save_pretrained(out)


class TimmVisionTower(nn.Module):
    """Any timm model with ``forward_intermediates``; returns the patch tokens (no prefix tokens) of ``layer``."""

    def __init__(self, model: nn.Module, layer: int, source: Path, config: dict):
        super().__init__()
        # timm's own pruning: drops the blocks after the chosen one, the final norm and the head.
        (self.index,) = model.prune_intermediate_layers([layer], prune_norm=True, prune_head=True)
        self.model = model
        self.config = config
        reduction = model.feature_info[self.index]["reduction"]
        size = model.pretrained_cfg["input_size"][-1]
        self.grid = (size // reduction, size // reduction)
        self.hidden_size = model.feature_info[self.index]["num_chs"]

    @classmethod
    def from_dir(cls, tower_dir: str | Path, layer: int = -2, weights: bool = True) -> TimmVisionTower:
        tower_dir = Path(tower_dir)
        config = _read_json(tower_dir / "config.json", TIMM_CONFIG)
        model = timm.create_model(config["architecture"], pretrained=False, pretrained_cfg=config["pretrained_cfg"],
                                  **config.get("model_args", {}))
        tower = cls(model, layer, tower_dir, config)
        if weights:
            _load_weights(tower.model, tower_dir)
        return tower

    @staticmethod
    def normalisation(tower_dir: Path) -> tuple[int, list[float], list[float]]:
        pretrained = _read_json(tower_dir / "config.json", TIMM_CONFIG)["pretrained_cfg"]
        return pretrained["input_size"][-1], pretrained["mean"], pretrained["std"]

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, or a convnet's stages up to the one read (FSDP wraps each as one unit):
        ``blocks`` or ``stages`` where the model has them (a ViT, a ConvNeXt), else the feature modules timm
        lists that hold parameters (a ResNet's ``layer1``, ``layer2``, ...; not the stem's activation)."""
        for name in ("blocks", "stages"):
            if hasattr(self.model, name):
                return list(getattr(self.model, name))
        stages = [self.model.get_submodule(info["module"]) for info in self.model.feature_info[:self.index + 1]]
        stages = [stage for stage in stages if any(True for _ in stage.parameters())]
        if not stages:
            raise ValueError(f"the timm tower {self.config.get('architecture')!r} has no blocks, stages or feature modules "
                             "with parameters to wrap one by one, as FSDP and activation checkpointing do")
        return stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.model.forward_intermediates(images, indices=[self.index], intermediates_only=True)
        # ViTs give (B, C, H, W) like convnets by default: (B, C, H, W) -> (B, H*W, C)
        return features.flatten(2).transpose(1, 2)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, out / WEIGHTS)


class OpenClipVisionTower(nn.Module):
    """The image tower of an open_clip model (its own ViT or a timm trunk), read at ``layer``."""

    def __init__(self, visual: nn.Module, layer: int, source: Path, config: dict):
        super().__init__()
        (self.index,) = visual.prune_intermediate_layers([layer], prune_norm=True, prune_head=True)
        self.visual = visual
        self.config = config
        trunk = getattr(visual, "trunk", None)  # a timm model inside open_clip (e.g. BiomedCLIP)
        self.grid = tuple(trunk.patch_embed.grid_size if trunk is not None else visual.grid_size)
        self.hidden_size = trunk.num_features if trunk is not None else config["model_cfg"]["vision_cfg"]["width"]

    @classmethod
    def from_dir(cls, tower_dir: str | Path, layer: int = -2, weights: bool = True) -> OpenClipVisionTower:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        tower_dir = Path(tower_dir)
        config = _read_json(tower_dir / "open_clip_config.json", "an open_clip local-dir config")
        model_cfg = config["model_cfg"]
        visual = _build_vision_tower(model_cfg["embed_dim"], CLIPVisionCfg(**model_cfg["vision_cfg"]),
                                     quick_gelu=model_cfg.get("quick_gelu", False))
        tower = cls(visual, layer, tower_dir, config)
        if weights:
            _load_weights(tower.visual, tower_dir, prefix="visual.")
        return tower

    @staticmethod
    def normalisation(tower_dir: Path) -> tuple[int, list[float], list[float]]:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        config = _read_json(tower_dir / "open_clip_config.json", "an open_clip local-dir config")
        preprocess = config.get("preprocess_cfg", {})
        return (config["model_cfg"]["vision_cfg"]["image_size"], preprocess.get("mean", OPENAI_DATASET_MEAN),
                preprocess.get("std", OPENAI_DATASET_STD))

    @property
    def blocks(self) -> nn.Module:
        """The transformer blocks (FSDP wraps each as one unit)."""
        trunk = getattr(self.visual, "trunk", None)
        return trunk.blocks if trunk is not None else self.visual.transformer.resblocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.visual.forward_intermediates(images, indices=[self.index], intermediates_only=True,
                                                   output_fmt="NCHW")
        (features,) = output["image_intermediates"]
        return features.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "open_clip_config.json").write_text(json.dumps(self.config, indent=2))
        weights = {f"visual.{k}": v.contiguous() for k, v in self.visual.state_dict().items()}
        save_file(weights, out / "open_clip_model.safetensors")


VisionTower = HFVisionTower | TimmVisionTower | OpenClipVisionTower
TOWERS = {"hf": HFVisionTower, "timm": TimmVisionTower, "open_clip": OpenClipVisionTower}


def tower_type_of(tower_dir: str | Path) -> str:
    """The family of the tower in ``tower_dir``, from the files each family's format writes: open_clip's
    ``open_clip_config.json``; timm's ``config.json``, which names an ``architecture``; else a Hugging Face
    ``config.json`` (its ``model_type`` is checked when the tower is built)."""
    tower_dir = Path(tower_dir)
    if (tower_dir / "open_clip_config.json").is_file():
        return "open_clip"
    config = _read_json(tower_dir / "config.json", "a Hugging Face, timm or open_clip vision tower's config")
    return "timm" if "architecture" in config else "hf"


def build_vision_tower(tower_type: str, tower_dir: str | Path, layer: int, weights: bool = True) -> VisionTower:
    if tower_type not in TOWERS:
        raise ValueError(f"model.net.vision.type={tower_type!r}: expected one of {TOWER_TYPES}")
    return TOWERS[tower_type].from_dir(tower_dir, layer, weights=weights)


def read_spec(tower_type: str, tower_dir: str | Path, layer: int) -> VisionSpec:
    """Image size, normalisation and token grid of a tower directory, without reading its weights
    (the architecture is built on the meta device, which allocates nothing)."""
    with torch.device("meta"):
        tower = build_vision_tower(tower_type, tower_dir, layer, weights=False)
    size, mean, std = tower.normalisation(Path(tower_dir))
    return VisionSpec(image_size=size, mean=tuple(mean), std=tuple(std), grid=tower.grid)
