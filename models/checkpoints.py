"""Reading our Lightning checkpoints and exporting them as base directories.

A base directory is laid out like NVILA's (``models.factory`` builds a model from one); an export adds
``temporal_fusion/`` and ``config.json`` (model_type lumen).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from common.contract import IMAGE_TOKEN
from common.files import atomic_directory, atomic_file
from models.config import ModelConfig
from models.factory import build_model, load_tokenizer, vision_type
from models.lumen import LumenModel
from models.vision import WEIGHTS

# The datamodule settings that shape a prompt and its images, carried from training into evaluation and exports.
PROMPT_KEYS = ("use_prior", "interval_in_prompt", "tasks", "experts_in_prompt", "expert_demographics", "image_resize",
               "history")


@dataclass
class LoadedCheckpoint:
    """A trained model and how it was trained to be prompted."""

    model: LumenModel
    config: ModelConfig
    prompt: dict[str, Any]  # the datamodule settings it was trained with (use_prior, interval_in_prompt, tasks, ...)
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
    """A LumenLitModule checkpoint as one dict of plain containers, from a file (read with
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
                raise ValueError(f"{path}: {key} is not a tensor; a LumenLitModule's state dict holds only tensors")
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


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """A LumenLitModule checkpoint (a file, or a sharded directory) or a directory written by ``export``."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        config = exported_config(path)
        summary = json.loads((path / "config.json").read_text())
        return LoadedCheckpoint(build_model(config).eval(), config, summary.get("prompt", {}), summary.get("max_new_tokens"))
    if not (path.is_file() or is_sharded(path)):
        raise FileNotFoundError(f"checkpoint {path} not found (expected a .ckpt file, a sharded checkpoint "
                                "directory or an exported directory)")
    checkpoint = read_training_checkpoint(path)
    config = ModelConfig(**checkpoint["hyper_parameters"]["net"])
    model = build_model(config)
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return LoadedCheckpoint(model.eval(), config, checkpoint.get("datamodule_hyper_parameters", {}),
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
        exported = ModelConfig(**{**config.to_dict(), "base": ".", "vision": {"type": vision_type(config), "layer": model.vision.index}})
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
| prompt | prior image {'used' if prompt.get('use_prior', True) else 'not used'}, interval in text {'yes' if prompt.get('interval_in_prompt', True) else 'no'}, expert predictions {'yes' if prompt.get('experts_in_prompt') else 'no'}, tasks {prompt.get('tasks', 'n/a')}, images `{prompt.get('image_resize', 'pad')}` to a square |

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
