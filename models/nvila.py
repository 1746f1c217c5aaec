"""What lumen takes from an NVILA directory's top-level ``config.json`` (``model_type: llava_llama``, the file
NVILA's own code builds its model from). Every value is checked against what lumen implements; one it does
not implement is refused (a ``ConfigError``: the entry points print it without a traceback), naming the
file, the field, the value and what is supported.

Followed:

- ``mm_vision_select_layer``: the tower layer the projector reads, an index into Hugging Face's
  ``hidden_states`` (0 the embeddings, i the output of layer i, negative from the end);
  ``model.net.vision.layer`` follows it and may not name another layer.
- ``mm_vision_select_feature``: which tokens of that layer. lumen feeds the patch tokens alone: that is
  ``cls_patch`` (every token) for a tower without a CLS token, such as SigLIP, and ``patch`` (all but the
  first) for a tower with one.
- ``dynamic_s2`` and ``s2_scales``: with dynamic S2 the projector reads one feature map per scale,
  concatenated on channels, and an untiled image's features are repeated once per scale. The number of
  scales must fit the projector's first Linear (``NvilaConfig.check_projector``), and the first scale, the
  size of an untiled image, must be the tower's resolution.
- ``image_aspect_ratio``: how an image becomes the tower's square. ``resize`` stretches it; ``dynamic`` and
  ``dynamic_s2`` tile a lone image, and give each image of a prompt with several to the tower's processor,
  which stretches it (bicubic, then its mean and std). lumen never tiles: every image, alone or with its
  prior, is one stretched tile (``squash``), NVILA's multi-image path, one policy for training and evaluation.

Refused: ``s2`` (the S2 tower runs every image at every scale), ``ps3``, ``image_aspect_ratio=pad`` (NVILA
pads at full resolution and then resizes; lumen's ``pad`` resizes and then pads, so the border differs), a
``vision_resolution`` other than the tower's (NVILA would interpolate its position embeddings), and an image
processor that does not stretch to the tower's square, or resizes other than bicubically where NVILA uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from common.errors import ConfigError
from models.vision import HFVisionTower

NVILA_MODEL_TYPE = "llava_llama"
EXPORT_MODEL_TYPE = "lumen"  # the config.json of our exports, read by models.checkpoints
# image_aspect_ratio -> lumen's resize policy (common.contract.RESIZE_POLICIES) for an untiled image.
ASPECT_RATIOS = {"resize": "squash", "dynamic": "squash", "dynamic_s2": "squash"}
# The values that tile a lone image; an untiled image then goes through the tower's image processor.
TILING = ("dynamic", "dynamic_s2")
# mm_vision_select_feature -> how many leading tokens of the layer's output NVILA drops.
DROPPED_TOKENS = {"cls_patch": 0, "patch": 1}
BICUBIC = 3  # PIL's code for bicubic resampling, as preprocessor_config.json stores it


@dataclass(frozen=True)
class NvilaConfig:
    """The settings lumen follows, read from a checked ``config.json``."""

    path: Path
    select_layer: int  # mm_vision_select_layer as stored
    vision_layer: int  # the same layer as lumen's index of a tower layer (models.vision)
    tower_layers: int
    tower_width: int
    scales: int  # feature maps the projector reads, concatenated on channels
    scales_from: str  # where ``scales`` comes from, for messages
    image_aspect_ratio: str

    @property
    def resize(self) -> str:
        """lumen's resize policy for this config's images (``common.contract.RESIZE_POLICIES``)."""
        return ASPECT_RATIOS[self.image_aspect_ratio]

    @property
    def tiles_lone_images(self) -> bool:
        return self.image_aspect_ratio in TILING

    def layer_for(self, configured: int | None) -> int:
        """The tower layer to read: this config's. ``model.net.vision.layer`` (``configured``) may be
        ``None`` or name the same layer; another layer is an error, since the projector was trained on
        this one's tokens."""
        layer = self.vision_layer % self.tower_layers
        if configured is not None and configured not in (layer, layer - self.tower_layers):
            raise ConfigError(
                f"model.net.vision.layer={configured} but {self.path} has mm_vision_select_layer={self.select_layer} "
                f"(lumen's layer {self.vision_layer}), the layer whose tokens NVILA's projector was trained on: set "
                "model.net.vision.layer=null to follow the base"
            )
        return self.vision_layer

    def check_projector(self, in_features: int, merge: int, weights: Path) -> None:
        """The projector's first Linear reads ``scales`` x the tower's width x the ``merge`` x ``merge``
        tokens it concatenates."""
        expected = self.scales * self.tower_width * merge * merge
        if in_features != expected:
            raise ConfigError(
                f"{weights}: the projector's first Linear (layers.2.weight) takes {in_features} input channels, but "
                f"{self.path} says {self.scales_from}: {self.scales} x the tower's {self.tower_width} channels x "
                f"{merge}x{merge} merged tokens = {expected}. The config.json and mm_projector/ are not of one model"
            )


def read_nvila_config(base: str | Path, tower_type: str) -> NvilaConfig | None:
    """The checked settings of ``base/config.json`` if ``base`` is an NVILA directory; ``None`` for a base
    without a top-level ``config.json`` (the demo's tiny base) or with a lumen export's."""
    path = Path(base) / "config.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    model_type = stored.get("model_type")
    if model_type == EXPORT_MODEL_TYPE:
        return None
    if model_type != NVILA_MODEL_TYPE:
        raise ConfigError(
            f"{path}: model_type {model_type!r}: the config.json of a base directory is NVILA's "
            f"({NVILA_MODEL_TYPE!r}) or a lumen export's ({EXPORT_MODEL_TYPE!r}); point model.net.base at such a "
            "directory, or at one without a top-level config.json"
        )
    if tower_type != "hf":
        raise ConfigError(f"model.net.vision.type={tower_type} but {path} is NVILA's, whose vision tower is a Hugging "
                         "Face model: set model.net.vision.type=hf")
    for name, what in (("s2", "the S2 tower runs every image at every one of s2_scales and merges the tiles"),
                       ("ps3", "PS3 selects high-resolution patches")):
        if stored.get(name):
            raise ConfigError(f"{path}: {name}={stored[name]!r}: {what}, which lumen does not implement; lumen runs the "
                             f"tower once per image at its own resolution (supported: {name}=false)")
    tower_dir = Path(base) / "vision_tower"
    tower = AutoConfig.from_pretrained(tower_dir)
    HFVisionTower.check_supported(tower.model_type, tower_dir)
    _check_feature(stored.get("mm_vision_select_feature"), path, tower.model_type, tower_dir)
    aspect = stored.get("image_aspect_ratio")
    if aspect not in ASPECT_RATIOS:
        why = {"pad": "NVILA pads an image to a square at full resolution and then resizes it, while lumen's "
                      "data.image_resize=pad resizes and then pads, which gives other pixels at the border"}
        raise ConfigError(f"{path}: image_aspect_ratio={aspect!r}: {why.get(aspect, 'not a policy lumen implements')}; "
                         f"supported: {', '.join(ASPECT_RATIOS)} (each image one untiled tile, stretched to the "
                         "tower's square)")
    scales, scales_from = _check_scales(stored, path, tower.image_size, tower_dir, aspect)
    resolution = stored.get("vision_resolution")
    if resolution not in (None, -1, tower.image_size):
        raise ConfigError(f"{path}: vision_resolution={resolution}: NVILA would interpolate the tower's position "
                         f"embeddings to it, which lumen does not; supported: -1 or the tower's {tower.image_size}")
    if stored.get("mm_hidden_size") not in (None, scales * tower.hidden_size):
        raise ConfigError(f"{path}: mm_hidden_size={stored['mm_hidden_size']} but {scales_from}: {scales} x the tower's "
                         f"{tower.hidden_size} channels = {scales * tower.hidden_size}")
    return NvilaConfig(
        path=path,
        select_layer=stored.get("mm_vision_select_layer"),
        vision_layer=_tower_layer(stored.get("mm_vision_select_layer"), tower.num_hidden_layers, path),
        tower_layers=tower.num_hidden_layers,
        tower_width=tower.hidden_size,
        scales=scales,
        scales_from=scales_from,
        image_aspect_ratio=aspect,
    )


def _tower_layer(select_layer, depth: int, path: Path) -> int:
    """NVILA's index into ``hidden_states`` as lumen's index of a tower layer (0: the first layer's output):
    the same for a negative index, one less for a positive one."""
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise ConfigError(f"{path}: mm_vision_select_layer={select_layer!r}: expected an integer (NVILA-8B: -2)")
    if not (-depth <= select_layer < 0 or 1 <= select_layer <= depth):
        raise ConfigError(
            f"{path}: mm_vision_select_layer={select_layer} is no layer of the {depth}-layer tower: as an index into "
            f"hidden_states, lumen supports -{depth}..-1 and 1..{depth} (0 and -{depth + 1} are the embeddings, before "
            "any layer)"
        )
    return select_layer if select_layer < 0 else select_layer - 1


def _check_feature(feature, path: Path, model_type: str, tower_dir: Path) -> None:
    """lumen feeds a layer's patch tokens alone: the selection must drop exactly the tower's prefix tokens."""
    if feature not in DROPPED_TOKENS:
        raise ConfigError(f"{path}: mm_vision_select_feature={feature!r}: expected one of {', '.join(DROPPED_TOKENS)}")
    prefix = HFVisionTower.PREFIX_TOKENS[model_type]
    if DROPPED_TOKENS[feature] != prefix:
        fits = next(name for name, dropped in DROPPED_TOKENS.items() if dropped == prefix)
        kept = "drops the first token" if DROPPED_TOKENS[feature] else "keeps every token"
        raise ConfigError(
            f"{path}: mm_vision_select_feature={feature!r} {kept} of the layer, but the {model_type} tower in "
            f"{tower_dir} has {prefix} token(s) before its patch tokens. lumen feeds the patch tokens alone, which "
            f"for this tower is mm_vision_select_feature={fits!r}, the one value supported with it"
        )


def _check_scales(stored: dict, path: Path, image_size: int, tower_dir: Path, aspect: str) -> tuple[int, str]:
    """How many scales the projector reads, and where that comes from; the size NVILA stretches an untiled
    image to must be the tower's, and its image processor must stretch bicubically where NVILA uses it."""
    processor_path = tower_dir / "preprocessor_config.json"
    processor = json.loads(processor_path.read_text()) if processor_path.is_file() else {}
    if aspect in TILING and processor.get("resample", BICUBIC) != BICUBIC:
        raise ConfigError(f"{processor_path}: resample={processor['resample']}: NVILA resizes untiled images with it, "
                         f"lumen bicubically; supported: {BICUBIC} (bicubic)")
    if stored.get("dynamic_s2"):
        value = stored.get("s2_scales")
        try:
            sizes = sorted(int(size) for size in (value.split(",") if isinstance(value, str) else value))
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"{path}: s2_scales={value!r}: expected image sizes such as \"448,896,1344\"") from None
        if not sizes or sizes[0] != image_size:
            raise ConfigError(f"{path}: s2_scales={value!r}: NVILA stretches an untiled image to the first scale, but "
                             f"the tower in {tower_dir} takes {image_size} px; supported: scales starting at "
                             f"{image_size}")
        return len(sizes), f"dynamic_s2 with s2_scales={value}"
    # Without dynamic S2 the processor's own size is the untiled image's (with it, NVILA overrides the size).
    size = processor.get("size", {"height": image_size, "width": image_size})
    if size != {"height": image_size, "width": image_size}:
        raise ConfigError(f"{processor_path}: size={size}: lumen stretches images to the tower's square; supported: "
                         f"{{'height': {image_size}, 'width': {image_size}}}")
    return 1, "no dynamic_s2, one scale"
