"""Building a LumenModel from a base directory, exporting it as one, and loading our Lightning checkpoints.

A base directory is laid out like NVILA's (``Efficient-Large-Model/NVILA-8B``), and read without
remote code:

    llm/              a Hugging Face causal LM + its tokenizer (AutoModelForCausalLM/AutoTokenizer)
    vision_tower/     a vision tower (``model.net.vision.type``: hf = SiglipVisionModel, timm, open_clip)
    mm_projector/     optional: NVILA's projector (config.json with mm_projector_type + model.safetensors
                      keyed ``layers.*``); absent = a fresh ``mlp_downsample``
    temporal_fusion/  optional (our exports): the temporal fusion's config and weights
    config.json       optional: NVILA's (model_type llava_llama) or ours (model_type lumen)

    python -m models.checkpoints export CKPT OUT_DIR

writes a trained Lightning checkpoint as such a directory (plus a model card);

    python -m models.checkpoints consolidate SHARDED_DIR OUT.ckpt

writes a sharded checkpoint (a directory of torch.distributed.checkpoint shards, as FSDP2 runs save
it) as one file laid out like a single-process run's. ``load_checkpoint`` reads all three
(``eval.py ckpt=`` takes them all, and so does ``export``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, AutoModelForCausalLM

from common.files import atomic_directory, atomic_file
from datamodules.collate import load_tokenizer as load_directory_tokenizer
from models.lumen import LumenModel
from models.projector import (
    FUSION_MODES,
    MERGE_SIZE,
    PROJECTOR_TYPES,
    MLPDownsampleProjector,
    TemporalFusion,
    tokens_per_image,
)
from models.vision import TOWER_TYPES, WEIGHTS, build_vision_tower, read_spec

IMAGE_TOKEN = "<image>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class VisionConfig:
    """The ``model/vision`` config group."""

    type: str = "hf"
    layer: int = -2  # NVILA reads SigLIP's second-to-last layer

    def __post_init__(self) -> None:
        if self.type not in TOWER_TYPES:
            raise ValueError(f"model.net.vision.type={self.type!r}: expected one of {TOWER_TYPES}")


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
    tune_vision: bool = True
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

    @property
    def llm_dir(self) -> Path:
        return _require_dir(Path(self.base) / "llm", "a Hugging Face causal LM (config.json, weights, tokenizer)")

    @property
    def vision_dir(self) -> Path:
        return _require_dir(Path(self.base) / "vision_tower", f"a {self.vision.type} vision tower")

    @property
    def projector_dir(self) -> Path:
        return Path(self.base) / "mm_projector"

    @property
    def fusion_dir(self) -> Path:
        return Path(self.base) / "temporal_fusion"

    def projector_type(self) -> str:
        """The configured projector, checked against the base's ``mm_projector`` if it has one."""
        config_path = self.projector_dir / "config.json"
        if not config_path.is_file():
            return self.projector or "mlp_downsample"
        stored = json.loads(config_path.read_text()).get("mm_projector_type")
        if stored not in PROJECTOR_TYPES:
            raise ValueError(f"{config_path}: mm_projector_type {stored!r} is not one of {PROJECTOR_TYPES}")
        if self.projector not in (None, stored):
            raise ValueError(
                f"model.net.projector={self.projector} but {config_path} holds a {stored} projector: "
                "set model.net.projector=null to use it"
            )
        return stored


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: model.net.base must point to a base-model directory with {path.name}/ "
            f"holding {what}. Set model.net.base=<dir> (the demo builds a tiny one automatically)."
        )
    return path


def input_spec(config: ModelConfig) -> dict[str, Any]:
    """What the collator must know: image size and normalisation, visual tokens per image, and how
    many token sets a two-image sample shows (``fusion_mode``)."""
    vision = read_spec(config.vision.type, config.vision_dir, config.vision.layer)
    return {
        "image_size": vision.image_size,
        "mean": list(vision.mean),
        "std": list(vision.std),
        "tokens_per_image": tokens_per_image(vision.grid, config.projector_type()),
        "image_token": IMAGE_TOKEN,
        "fusion_mode": config.fusion.mode,
    }


def load_tokenizer(config: ModelConfig):
    """The LLM's tokenizer with NVILA's ``<image>`` special token (added if the directory lacks it)."""
    return load_directory_tokenizer(config.llm_dir, IMAGE_TOKEN)


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
        llm = AutoModelForCausalLM.from_pretrained(config.llm_dir, **options)
    else:
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.llm_dir), **options)
    if llm.get_input_embeddings().num_embeddings < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    return llm


def _projector(config: ModelConfig, vision, llm_size: int, weights: bool = True) -> MLPDownsampleProjector:
    """A fresh projector, or the base's ``mm_projector`` (NVILA's key names) with its weights unless ``weights=False``."""
    projector_type = config.projector_type()
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
    vision = build_vision_tower(config.vision.type, config.vision_dir, config.vision.layer, weights=weights)
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


# The datamodule settings that shape a prompt, carried from training into evaluation and exports.
PROMPT_KEYS = ("use_prior", "interval_in_prompt", "tasks", "experts_in_prompt", "expert_demographics")


@dataclass
class Loaded:
    """A trained model and how it was trained to be prompted."""

    model: LumenModel
    config: ModelConfig
    prompt: dict[str, Any]  # the datamodule settings it was trained with (use_prior, interval_in_prompt, tasks)
    max_new_tokens: int | None = None


# What Lightning's ModelParallelStrategy writes beside the shards: everything but weights and optimizer.
SHARDED_METADATA = "meta.pt"
# What a consolidated checkpoint keeps: the weights and what evaluation and export need to use them.
# (Optimizer, scheduler and loop state stay in the sharded directory, which is what a run resumes from.)
CONSOLIDATED_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hparams_name",
                     "hyper_parameters", "datamodule_hparams_name", "datamodule_hyper_parameters")


def is_sharded(path: Path) -> bool:
    """A directory written by torch.distributed.checkpoint (``.metadata``) through Lightning (``meta.pt``)."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / SHARDED_METADATA).is_file()


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A LumenModule checkpoint as one dict of plain containers, from a file (read with
    ``weights_only=True``) or a sharded directory, whose weights are read whole in this one process
    (the shards' optimizer state is not read)."""
    path = Path(path)
    if not is_sharded(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=True)
    reader = FileSystemReader(path)
    prefix = "state_dict."  # the model's entries; ModelParallelStrategy stores the optimizer's as optimizer_<i>.
    weights = {}
    for key, stored in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(prefix):
            if not isinstance(stored, TensorStorageMetadata):
                raise ValueError(f"{path}: {key} is not a tensor; a LumenModule's state dict holds only tensors")
            weights[key[len(prefix):]] = torch.empty(stored.size, dtype=stored.properties.dtype)
    if not weights:
        raise ValueError(f"{path}: the shards hold no model weights (no state_dict.* entries)")
    dcp.load({"state_dict": weights}, storage_reader=reader, no_dist=True)  # in this process, shards read whole
    return {**checkpoint, "state_dict": weights}


def consolidate(sharded: str | Path, out: str | Path) -> Path:
    """Writes a sharded checkpoint as one file with a single-process checkpoint's layout (``state_dict``
    with ``model.`` keys, ``hyper_parameters``, ``datamodule_hyper_parameters``; plain containers that
    load with ``torch.load(weights_only=True)``), atomically."""
    sharded = Path(sharded)
    if not is_sharded(sharded):
        raise ValueError(f"{sharded} is not a sharded checkpoint: expected a directory with .metadata and "
                         f"{SHARDED_METADATA}, as a trainer=fsdp run writes (checkpoints/last.ckpt)")
    checkpoint = read_training_checkpoint(sharded)
    with atomic_file(out) as staging:
        torch.save({key: checkpoint[key] for key in CONSOLIDATED_KEYS if key in checkpoint}, staging)
    return Path(out)


def load_checkpoint(path: str | Path) -> Loaded:
    """A LumenModule checkpoint (a file, or a sharded directory) or a directory written by ``export``."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        config = exported_config(path)
        summary = json.loads((path / "config.json").read_text())
        return Loaded(build_model(config).eval(), config, summary.get("prompt", {}), summary.get("max_new_tokens"))
    if not (path.is_file() or is_sharded(path)):
        raise FileNotFoundError(f"checkpoint {path} not found (expected a .ckpt file, a sharded checkpoint "
                                "directory or an exported directory)")
    checkpoint = read_training_checkpoint(path)
    config = ModelConfig(**checkpoint["hyper_parameters"]["net"])
    model = build_model(config)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return Loaded(model.eval(), config, checkpoint.get("datamodule_hyper_parameters", {}),
                  checkpoint["hyper_parameters"].get("max_new_tokens"))


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Writes a trained checkpoint as a self-contained base directory (atomically)."""
    loaded = load_checkpoint(checkpoint)
    model, config, data = loaded.model, loaded.config, loaded.prompt
    out = Path(out)
    with atomic_directory(out) as staging:
        model.llm.save_pretrained(staging / "llm")
        load_tokenizer(config).save_pretrained(staging / "llm")
        model.vision.save(staging / "vision_tower")
        if (config.vision_dir / "preprocessor_config.json").is_file():
            shutil.copy(config.vision_dir / "preprocessor_config.json", staging / "vision_tower")
        for name, module, extra in (
            ("mm_projector", model.projector, {"model_type": "v2l_projector", "mm_projector_type": model.projector.projector_type}),
            ("temporal_fusion", model.fusion, {"model_type": "lumen_temporal_fusion", **asdict(config.fusion)}),
        ):
            (staging / name).mkdir()
            (staging / name / "config.json").write_text(json.dumps(extra, indent=2))
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, staging / name / WEIGHTS)
        # The exported tower holds only the layers up to the chosen one: address it by absolute index.
        exported = ModelConfig(**{**config.to_dict(), "base": ".", "vision": {"type": config.vision.type, "layer": model.vision.index}})
        summary = {
            "model_type": "lumen",
            "architectures": ["LumenModel"],
            "lumen": {k: v for k, v in exported.to_dict().items() if k != "base"},
            "mm_projector_type": model.projector.projector_type,
            "mm_hidden_size": model.projector.mm_hidden_size,
            "tokens_per_image": model.tokens_per_image,
            "image_token": IMAGE_TOKEN,
            "prompt": {key: data[key] for key in PROMPT_KEYS if key in data},
            "max_new_tokens": loaded.max_new_tokens,
        }
        (staging / "config.json").write_text(json.dumps(summary, indent=2))
        (staging / "README.md").write_text(model_card(summary, Path(checkpoint)))
    return out


def exported_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a directory written by ``export``."""
    path = Path(directory) / "config.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("model_type") != "lumen":
        raise ValueError(f"{path} is not a lumen export (model_type {summary.get('model_type')!r})")
    return ModelConfig(base=str(directory), **summary["lumen"])


def model_card(summary: dict, checkpoint: Path) -> str:
    lumen, prompt = summary["lumen"], summary["prompt"]
    return f"""# LUMEN longitudinal chest X-ray VLM

Exported by `python -m models.checkpoints export` from `{checkpoint.name}`.

| | |
|---|---|
| vision tower | `{lumen['vision']['type']}`, patch tokens of layer {lumen['vision']['layer']} (the saved tower ends there) |
| projector | `{summary['mm_projector_type']}` (NVILA's `mm_projector` key names), {summary['tokens_per_image']} tokens per image |
| temporal fusion | mode `{lumen['fusion']['mode']}`, interval embedding {'on' if lumen['fusion']['interval_embedding'] else 'off'} |
| prompt | prior image {'used' if prompt.get('use_prior', True) else 'not used'}, interval in text {'yes' if prompt.get('interval_in_prompt', True) else 'no'}, expert predictions {'yes' if prompt.get('experts_in_prompt') else 'no'}, tasks {prompt.get('tasks', 'n/a')} |

Load it with lumen, no remote code:

```python
from models.checkpoints import load_checkpoint
model = load_checkpoint("path/to/this/directory").model
```

`llm/` is a plain Hugging Face causal LM with its tokenizer (ChatML, `<image>` special token);
`vision_tower/`, `mm_projector/` and `temporal_fusion/` hold safetensors weights.

Research use only; not a medical device. Trained on data that may carry the biases of its sources.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export_parser = commands.add_parser("export", help="write a Lightning checkpoint as a self-contained directory")
    export_parser.add_argument("checkpoint", type=Path)
    export_parser.add_argument("out", type=Path)
    consolidate_parser = commands.add_parser("consolidate", help="write a sharded checkpoint as one .ckpt file")
    consolidate_parser.add_argument("sharded", type=Path)
    consolidate_parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        print(f"exported to {export(args.checkpoint, args.out)}")
    else:
        print(f"consolidated into {consolidate(args.sharded, args.out)}")


if __name__ == "__main__":
    main()
