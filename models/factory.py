"""Building a LumenModel from a base directory laid out like NVILA's (``Efficient-Large-Model/NVILA-8B``),
read without remote code:

    config.json       optional: NVILA's (model_type llava_llama), whose vision layer and token selection,
                      image scales and image policy are followed and checked (``models.nvila``)
    llm/              a Hugging Face causal LM + its tokenizer (AutoModelForCausalLM/AutoTokenizer)
    vision_tower/     a vision tower (``model.net.vision.type``: hf = SiglipVisionModel, timm, open_clip;
                      null = whichever the directory holds)
    lumen-base.json   optional: a tiny base's manifest (``run.tiny_base``), naming the layer its tower is read at
    mm_projector/     optional: NVILA's projector (config.json with mm_projector_type + model.safetensors
                      keyed ``layers.*``); absent = a fresh ``mlp_downsample``
    temporal_fusion/  optional (our exports): the temporal fusion's config and weights

and what the collator must know of the model built from it (``input_spec``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from common.contract import IMAGE_TOKEN, InputSpec
from common.tokenizer import load_tokenizer as load_directory_tokenizer
from models.config import DEFAULT_VISION_LAYER, DTYPES, TINY_BASE_LAYERS, ModelConfig
from models.fusion import TemporalFusion
from models.lumen import LumenModel
from models.nvila import NvilaConfig, read_nvila_config
from models.projector import MERGE_SIZE, PROJECTOR_TYPES, MLPDownsampleProjector, tokens_per_image
from models.vision import WEIGHTS, build_vision_tower, read_spec, tower_type_of

log = logging.getLogger(__name__)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: model.net.base must point to a base-model directory with {path.name}/ "
            f"holding {what}. Set model.net.base=<dir> (the demo builds a tiny one automatically)."
        )
    return path


def llm_dir(config: ModelConfig) -> Path:
    """The base's ``llm/``, or an error saying what ``model.net.base`` must hold."""
    return _require_dir(config.llm_dir, "a Hugging Face causal LM (config.json, weights, tokenizer)")


def vision_dir(config: ModelConfig) -> Path:
    """The base's ``vision_tower/``, or an error saying what ``model.net.base`` must hold."""
    return _require_dir(config.vision_dir, f"a {config.vision.type or 'Hugging Face, timm or open_clip'} vision tower")


def vision_type(config: ModelConfig) -> str:
    """``model.net.vision.type``, or if null the family of the tower the base holds; a type that is not that
    family is refused (its loader would fail on the other format's files, far from the cause)."""
    held = tower_type_of(vision_dir(config))
    if config.vision.type not in (None, held):
        raise ValueError(f"model.net.vision.type={config.vision.type} but {config.vision_dir} holds a {held} tower: "
                         f"set model/vision=base (or model.net.vision.type={held})")
    return held


def nvila_config(config: ModelConfig) -> NvilaConfig | None:
    """The base's NVILA ``config.json``, checked (``models.nvila``); ``None`` if the base is no NVILA directory."""
    return read_nvila_config(config.base, vision_type(config))  # vision_type names a missing tower first


def vision_layer(config: ModelConfig, nvila: NvilaConfig | None) -> int:
    """The tower layer to read: an NVILA base's (``model.net.vision.layer`` may only name the same one), else
    ``model.net.vision.layer``, else a tiny base's ``vision_layer``, else ``DEFAULT_VISION_LAYER``."""
    if nvila is not None:
        return nvila.layer_for(config.vision.layer)
    if config.vision.layer is not None:
        return config.vision.layer
    if config.manifest_path.is_file():
        manifest = json.loads(config.manifest_path.read_text())
        return manifest.get("vision_layer", TINY_BASE_LAYERS[manifest.get("vision_tower", "siglip")])
    return DEFAULT_VISION_LAYER


def resolved_projector_type(config: ModelConfig) -> str:
    """The configured projector, checked against the base's ``mm_projector`` if it has one."""
    config_path = config.projector_dir / "config.json"
    if not config_path.is_file():
        return config.projector or "mlp_downsample"
    stored = json.loads(config_path.read_text()).get("mm_projector_type")
    if stored not in PROJECTOR_TYPES:
        raise ValueError(f"{config_path}: mm_projector_type {stored!r} is not one of {PROJECTOR_TYPES}")
    if config.projector not in (None, stored):
        raise ValueError(
            f"model.net.projector={config.projector} but {config_path} holds a {stored} projector: "
            "set model.net.projector=null to use it"
        )
    return stored


def input_spec(config: ModelConfig) -> InputSpec:
    """What the collator must know: image size and normalisation, visual tokens per image, how many token
    sets a two-image sample shows (``fusion_mode``), and how an NVILA base was trained to see images
    (``resize``; ``None`` for a base that does not say). An NVILA base is checked here as in
    ``build_model``, so a run stops on an unsupported value before any data is read."""
    nvila = nvila_config(config)
    vision = read_spec(vision_type(config), vision_dir(config), vision_layer(config, nvila))
    projector_type = resolved_projector_type(config)
    if nvila is not None:
        if (config.projector_dir / "config.json").is_file():
            _stored_projector_scales(config, projector_type, nvila.tower_width, nvila)
        if nvila.tiles_lone_images:
            log.info("%s: image_aspect_ratio=%s tiles a lone image; lumen does not: every image, alone or with its "
                     "prior, is one %d px tile stretched to the tower's square, as NVILA feeds the images of a "
                     "multi-image prompt", nvila.path, nvila.image_aspect_ratio, vision.image_size)
    return InputSpec(
        image_size=vision.image_size,
        mean=tuple(vision.mean),
        std=tuple(vision.std),
        tokens_per_image=tokens_per_image(vision.grid, projector_type),
        image_token=IMAGE_TOKEN,
        fusion_mode=config.fusion.mode,
        resize=nvila.resize if nvila is not None else None,
    )


def load_tokenizer(config: ModelConfig):
    """The LLM's tokenizer with NVILA's ``<image>`` special token (added if the directory lacks it)."""
    return load_directory_tokenizer(llm_dir(config), IMAGE_TOKEN)


def _load_llm(config: ModelConfig, vocab_size: int, weights: bool = True):
    """The causal LM of ``llm/``: its weights, or (``weights=False``) only its architecture from config.json."""
    if weights and config.attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "model.net.attn_implementation=flash_attention_2 needs the flash-attn package "
                "(pip install -e '.[gpu]' on a CUDA machine); use sdpa on CPU"
            ) from error
    options = {"dtype": DTYPES[config.dtype], "attn_implementation": config.attn_implementation}
    if weights:
        llm = AutoModelForCausalLM.from_pretrained(llm_dir(config), **options)
    else:
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm_dir(config)), **options)
    if llm.get_input_embeddings().num_embeddings < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm


def _stored_projector_scales(config: ModelConfig, projector_type: str, vision_size: int,
                             nvila: NvilaConfig | None) -> int:
    """The image scales the base's ``mm_projector`` reads concatenated on channels (NVILA-8B: three, its
    mm_hidden_size 3x the tower's), from its first Linear's input width in the weights' header (so without
    reading weights), checked against an NVILA ``config.json``."""
    weights_path = config.projector_dir / WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{config.projector_dir} has config.json but no {WEIGHTS}")
    with safe_open(weights_path, "pt") as stored:
        in_features = stored.get_slice("layers.2.weight").get_shape()[1]
    merge = MERGE_SIZE[projector_type]
    if nvila is not None:
        nvila.check_projector(in_features, merge, weights_path)
    scales, remainder = divmod(in_features, merge * merge * vision_size)
    if remainder or scales < 1:
        raise ValueError(
            f"{weights_path}: layers.2.weight takes {in_features} input channels, not a multiple of "
            f"{merge}x{merge} merged tokens x the vision tower's {vision_size} channels"
        )
    return scales


def _projector(config: ModelConfig, vision, llm_size: int, nvila: NvilaConfig | None,
               weights: bool = True) -> MLPDownsampleProjector:
    """A fresh projector, or the base's ``mm_projector`` (NVILA's key names) with its weights unless ``weights=False``."""
    projector_type = resolved_projector_type(config)
    if not (config.projector_dir / "config.json").is_file():
        return MLPDownsampleProjector(vision.grid, vision.hidden_size, llm_size, projector_type)
    scales = _stored_projector_scales(config, projector_type, vision.hidden_size, nvila)
    projector = MLPDownsampleProjector(vision.grid, vision.hidden_size, llm_size, projector_type, scales=scales)
    if weights:
        projector.load_state_dict(load_file(config.projector_dir / WEIGHTS))
    return projector


def build_model(config: ModelConfig, weights: bool = True) -> LumenModel:
    """Loads the LLM, the vision tower and (if the base has them) projector and fusion weights.

    ``weights=False`` builds the same architecture from the configuration files alone and reads no
    weights: under ``torch.device("meta")`` it allocates nothing (FSDP2 shards it before it is
    materialised; ``models.parallel.build_sharded``). Parts the base does not hold (a new projector or
    fusion) are initialised fresh either way.
    """
    dtype = DTYPES[config.dtype]
    tokenizer = load_tokenizer(config)
    llm = _load_llm(config, len(tokenizer), weights)
    nvila = nvila_config(config)
    vision = build_vision_tower(vision_type(config), vision_dir(config), vision_layer(config, nvila), weights=weights)
    llm_size = llm.config.hidden_size
    projector = _projector(config, vision, llm_size, nvila, weights)
    fusion = TemporalFusion(llm_size, projector.tokens_per_image, mode=config.fusion.mode,
                            heads=config.fusion.heads, use_interval=config.fusion.interval_embedding)
    if (config.fusion_dir / WEIGHTS).is_file():
        stored = json.loads((config.fusion_dir / "config.json").read_text())
        for key in ("mode", "interval_embedding"):
            if stored.get(key) != getattr(config.fusion, key):
                raise ValueError(
                    f"model.net.fusion.{key}={getattr(config.fusion, key)} but {config.fusion_dir} holds weights "
                    f"trained with {key}={stored.get(key)}: set model.net.fusion.{key}={stored.get(key)}"
                )
        if weights:
            fusion.load_state_dict(load_file(config.fusion_dir / WEIGHTS))
    model = LumenModel(vision, projector, fusion, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).to(dtype)
    for part, tune in ((model.vision, config.tune_vision), (model.projector, config.tune_projector),
                       (model.fusion, config.tune_projector), (model.llm, config.tune_llm)):
        if not tune:
            part.requires_grad_(False)
    return model
