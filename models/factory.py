"""Building a LumenModel from a base directory laid out like NVILA's (``Efficient-Large-Model/NVILA-8B``),
read without remote code:

    llm/              a Hugging Face causal LM + its tokenizer (AutoModelForCausalLM/AutoTokenizer)
    vision_tower/     a vision tower (``model.net.vision.type``: hf = SiglipVisionModel, timm, open_clip)
    mm_projector/     optional: NVILA's projector (config.json with mm_projector_type + model.safetensors
                      keyed ``layers.*``); absent = a fresh ``mlp_downsample``
    temporal_fusion/  optional (our exports): the temporal fusion's config and weights

and what the collator must know of the model built from it (``input_spec``).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from common.contract import IMAGE_TOKEN, InputSpec
from common.tokenizer import load_tokenizer as load_directory_tokenizer
from models.config import DTYPES, ModelConfig
from models.fusion import TemporalFusion
from models.lumen import LumenModel
from models.projector import MERGE_SIZE, PROJECTOR_TYPES, MLPDownsampleProjector, tokens_per_image
from models.vision import WEIGHTS, build_vision_tower, read_spec


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
    return _require_dir(config.vision_dir, f"a {config.vision.type} vision tower")


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
    """What the collator must know: image size and normalisation, visual tokens per image, and how
    many token sets a two-image sample shows (``fusion_mode``)."""
    vision = read_spec(config.vision.type, vision_dir(config), config.vision.layer)
    return InputSpec(
        image_size=vision.image_size,
        mean=tuple(vision.mean),
        std=tuple(vision.std),
        tokens_per_image=tokens_per_image(vision.grid, resolved_projector_type(config)),
        image_token=IMAGE_TOKEN,
        fusion_mode=config.fusion.mode,
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


def _projector(config: ModelConfig, vision, llm_size: int, weights: bool = True) -> MLPDownsampleProjector:
    """A fresh projector, or the base's ``mm_projector`` (NVILA's key names) with its weights unless ``weights=False``."""
    projector_type = resolved_projector_type(config)
    weights_path = config.projector_dir / WEIGHTS
    if not (config.projector_dir / "config.json").is_file():
        return MLPDownsampleProjector(vision.grid, vision.hidden_size, llm_size, projector_type)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{config.projector_dir} has config.json but no {WEIGHTS}")
    # The shape comes from the file's header, so the architecture is known without reading weights.
    with safe_open(weights_path, "pt") as stored:
        merged_channels = stored.get_slice("layers.1.weight").get_shape()[0]
    # NVILA-8B's projector reads three image scales concatenated on channels (mm_hidden_size 3x the tower's).
    k2 = MERGE_SIZE[projector_type] ** 2
    scales, remainder = divmod(merged_channels, k2 * vision.hidden_size)
    if remainder or scales < 1:
        raise ValueError(
            f"{weights_path}: layers.1.weight has {merged_channels} channels, not a multiple of "
            f"{k2} x the vision tower's {vision.hidden_size}"
        )
    projector = MLPDownsampleProjector(vision.grid, vision.hidden_size, llm_size, projector_type, scales=scales)
    if weights:
        projector.load_state_dict(load_file(weights_path))
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
    vision = build_vision_tower(config.vision.type, vision_dir(config), config.vision.layer, weights=weights)
    llm_size = llm.config.hidden_size
    projector = _projector(config, vision, llm_size, weights)
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
