"""Writes a tiny base model to disk in the layout a real one has, so the same loaders read both.

    BASE/llm/            Hugging Face Qwen2ForCausalLM + tokenizer (ChatML, <image> special token)
    BASE/vision_tower/   timm ViT in timm's local-dir format (config.json + model.safetensors)
    BASE/lumen-base.json what was built, from what (written last: marks the directory complete)

The tokenizer is a byte-level BPE trained on the synthetic world's questions, answers and reports.

    python -m models.tiny --world DIR --out BASE
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import timm
import torch
from timm.models import save_for_hf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
# ChatML as NVILA/Qwen2 use it; a default system turn is added when the messages have none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_VISION = dict(
    architecture="vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=4
)
DEFAULT_LLM = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=384, max_position_embeddings=1024, rope_theta=10000.0,
)
MANIFEST = "lumen-base.json"


def world_corpus(world_dir: Path) -> Iterator[str]:
    """Every question, answer and report sentence of a Diff-VQA-format world."""
    questions = pd.read_csv(world_dir / "medical-diff-vqa" / "mimic_pair_questions.csv")
    yield from questions["question"].astype(str)
    yield from questions["answer"].astype(str)
    for report in sorted((world_dir / "mimic-cxr-reports").rglob("*.txt")):
        yield report.read_text()


def train_tokenizer(corpus: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Prompts add words the corpus lacks (e.g. "Image", digits of intervals); keep them cheap.
    extra = [
        "system user assistant You are a helpful assistant",
        "Image-1 (prior study): Image-2 (current study): The prior study was taken 0123456789 days earlier.",
    ]
    bpe.train_from_iterator(list(corpus) + extra, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=DEFAULT_LLM["max_position_embeddings"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_base(
    out: str | Path,
    world: str | Path,
    vision: dict | None = None,
    llm: dict | None = None,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Builds the tiny base into ``out`` (atomically: a temp directory renamed into place)."""
    out, world = Path(out), Path(world)
    vision = {**DEFAULT_VISION, **(vision or {})}
    llm = {**DEFAULT_LLM, **(llm or {})}
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = train_tokenizer(world_corpus(world), vocab_size)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **llm,
        )
        Qwen2ForCausalLM(config).save_pretrained(staging / "llm")
        tokenizer.save_pretrained(staging / "llm")

        model_args = {k: v for k, v in vision.items() if k != "architecture"}
        model_args.update(num_classes=0, class_token=False, global_pool="avg")
        tower = timm.create_model(vision["architecture"], pretrained=False, **model_args)
        save_for_hf(tower, str(staging / "vision_tower"), model_args=model_args, safe_serialization=True)

        manifest = {"world": str(world.resolve()), "vision": vision, "llm": llm, "vocab_size": vocab_size, "seed": seed}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_tiny_base(out: str | Path, world: str | Path, **options) -> Path:
    """Builds the tiny base unless ``out`` already holds one built with the same options."""
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.is_file():
        built = json.loads(manifest.read_text())
        wanted = {
            "world": str(Path(world).resolve()),
            "vision": {**DEFAULT_VISION, **(options.get("vision") or {})},
            "llm": {**DEFAULT_LLM, **(options.get("llm") or {})},
            "vocab_size": options.get("vocab_size", 1024),
            "seed": options.get("seed", 0),
        }
        if built == wanted:
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a tiny base built by lumen (no {MANIFEST}); choose another path")
    return build_tiny_base(out, world, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, type=Path, help="synthetic world directory (python -m datamodules.synthetic)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = ensure_tiny_base(args.out, args.world, seed=args.seed)
    print(f"tiny base model in {path}")


if __name__ == "__main__":
    main()
