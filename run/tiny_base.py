"""Writes a tiny base model to disk in the layout a real one has, so the same loaders read both.

    BASE/llm/            Hugging Face Qwen2ForCausalLM + tokenizer (ChatML, <image> special token)
    BASE/vision_tower/   a small timm ResNet in timm's local-dir format (the default), or with
                         vision_tower="siglip" a Hugging Face SiglipVisionModel + preprocessor_config.json, as in NVILA
    BASE/lumen-base.json what was built, from what, and the layer the tower is read at (vision_layer,
                         which model.net.vision.layer=null follows); written last: marks the directory complete

The tokenizer is a byte-level BPE trained on the synthetic world's questions, answers and reports;
the vision tower is pretrained on the world's training-split labels or, with
``vision_pretrain_subjects``, on a population drawn for it alone (see ``pretrain_vision_tower``).

    python -m run.tiny_base --world DIR --out BASE
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import save_for_hf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from common.contract import IMAGE_TOKEN
from common.files import atomic_directory
from datamodules.collate import image_transform
from datamodules.mimic import CHEXPERT_LABELS, load_chexpert, load_images
from datamodules.synthetic.drawing import render_image
from datamodules.synthetic.population import ImageRecord, Study, simulate_population
from datamodules.synthetic.writer import draw_in_processes
from models.config import BASE_MANIFEST, TINY_BASE_LAYERS

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
    image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512
)
DEFAULT_LLM = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=384, max_position_embeddings=1024, rope_theta=10000.0,
)
# The tower families a tiny base can have. resnet (the default): a small timm ResNet, BioViL-T's kind of CXR
# tower, read at its second stage, 8 x 8 tokens at 64 px, after timm's default stem (a 7 x 7 convolution to 64
# channels and a max-pool); its last two stages are built, as a timm ResNet needs, but never read. siglip:
# NVILA's kind, a ViT, read at its last layer. On the demo's world the ResNet's tokens read the findings far
# better than the tiny ViT's (docs/results.md). The manifest names the layer (TINY_BASE_LAYERS) and the model
# finds the family from the tower's files, so model/vision needs no override for either.
VISION_TOWERS = ("resnet", "siglip")
RESNET_READ_STAGE = TINY_BASE_LAYERS["resnet"]
DEFAULT_RESNET = dict(image_size=64, channels=[32, 64, 128, 128])
RESNET_NORMALISATION = (0.5, 0.5, 0.5)
MANIFEST = BASE_MANIFEST
# Images per tower pretraining step (64 before the option existed: such bases are rebuilt).
PRETRAIN_BATCH_SIZE = 32


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


def world_pretraining_set(world: Path, image_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's train-split images (never val/test) with their study's 14 CheXpert labels
    (positive = 1.0) and their view: (images, 3, size, size) pixels and (images, labels) targets."""
    jpg = world / "mimic-cxr-jpg"
    images = load_images(jpg).query("split == 'train'").merge(load_chexpert(jpg), on=["subject_id", "study_id"])
    labels = [column for column in images.columns if column in CHEXPERT_LABELS]
    targets = torch.tensor(
        np.concatenate([(images[labels] == 1.0).to_numpy(), pd.get_dummies(images["view"]).to_numpy()], axis=1),
        dtype=torch.float32,
    )
    pixels = torch.stack([image_transform(Image.open(path), image_size, mean, std) for path in images["path"]])
    return pixels, targets


# The drawn population's seed is the base's seed plus this, so it is not a world of a small seed
# (build_tiny_base refuses the one world whose seed it is).
DRAWN_SEED_OFFSET = 1_000_003
DRAWN_VIEWS = ("PA", "AP", "LATERAL")


def _draw_small(job: tuple[Study, ImageRecord, int, int, int]) -> np.ndarray:
    """One image of a drawn study at ``rows`` rows, from its own random stream (the same pixels whichever
    process draws it)."""
    study, image, rows, seed, index = job
    small = replace(image, rows=rows, columns=max(1, round(rows * image.columns / image.rows)))
    return render_image(study, small, np.random.default_rng([seed, 3, index]))


def drawn_pretraining_set(subjects: int, seed: int, image_size: int, mean, std,
                          workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of a population drawn for pretraining alone (never written), each with the presence
    of every finding site (side, zone, device) and its view: the tiny tower's stand-in for the large
    labelled corpora a real tower is pretrained on. Each image is drawn at twice the tower's input
    size, so that, like the world's 240-320 px images, it is downsampled (and its noise averaged) on
    the way in."""
    studies = simulate_population(subjects, seed)
    images = [(study, image) for study in studies for image in study.images]
    jobs = [(study, image, 2 * image_size, seed, index) for index, (study, image) in enumerate(images)]
    targets = torch.tensor(
        [[*(level > 0 for level in study.levels), *(image.view == view for view in DRAWN_VIEWS)] for study, image in images],
        dtype=torch.float32,
    )
    pixels = torch.empty(len(jobs), 3, image_size, image_size)
    drawn = draw_in_processes(_draw_small, jobs, workers, f"drawing {subjects} subjects' images for tower pretraining")
    for index, image in enumerate(drawn):
        pixels[index] = image_transform(Image.fromarray(image), image_size, mean, std)
    return pixels, targets


def siglip_tokens(tower: SiglipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, C): a SigLIP tower's last-layer tokens."""
    return tower(pixel_values=pixels).last_hidden_state


def resnet_tokens(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, N, C): a timm ResNet's tokens at the stage the VLM reads (``RESNET_READ_STAGE``)."""
    (features,) = tower.forward_intermediates(pixels, indices=[RESNET_READ_STAGE], intermediates_only=True,
                                              stop_early=True)
    return features.flatten(2).transpose(1, 2)


def resnet_arguments(vision: dict) -> dict:
    """timm's ResNet arguments for ``vision``'s stage widths: one basic block per stage, no head."""
    return dict(num_classes=0, global_pool="", layers=[1, 1, 1, 1], channels=list(vision["channels"]))


def resnet_tower(vision: dict) -> torch.nn.Module:
    """A small timm ResNet for ``vision``'s image size and stage widths."""
    size = vision["image_size"]
    return timm.create_model("resnet18", pretrained=False, **resnet_arguments(vision),
                             pretrained_cfg_overlay=dict(input_size=(3, size, size), mean=RESNET_NORMALISATION,
                                                         std=RESNET_NORMALISATION))


def pretrain_vision_tower(tower: torch.nn.Module, pixels: torch.Tensor, targets: torch.Tensor, steps: int, seed: int,
                          lr: float = 1e-3, batch_size: int = PRETRAIN_BATCH_SIZE, tokens=siglip_tokens,
                          pool: str = "mean") -> float:
    """Multi-label pretraining of the tower on ``pixels`` and their ``targets`` (``world_pretraining_set``
    or ``drawn_pretraining_set``): a linear head reads the mean of its ``tokens`` (``pool="mean"``), or
    reads every token and keeps the largest logit per label (``pool="max"``: each token must carry the
    findings it shows, which is what the VLM reads). Returns the last batch's loss.

    A real base model comes with a pretrained vision tower (SigLIP for NVILA); a tower at random
    initialisation makes a tiny VLM spend most of a CPU budget learning to see, so the tiny base gets
    the equivalent of that pretraining.
    """
    if pool not in ("mean", "max"):
        raise ValueError(f"pool={pool!r}: expected 'mean' or 'max'")
    with torch.no_grad():
        width = tokens(tower, pixels[:1]).shape[-1]
    head = torch.nn.Linear(width, targets.shape[1])
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="pretraining the tiny vision tower", unit="step"):
        batch = torch.randint(len(pixels), (batch_size,), generator=generator)
        read = tokens(tower, pixels[batch])
        logits = head(read.mean(dim=1)) if pool == "mean" else head(read).amax(dim=1)
        loss = F.binary_cross_entropy_with_logits(logits, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def base_manifest(world: str | Path, vision: dict | None = None, llm: dict | None = None, vocab_size: int = 1024,
                  vision_pretrain_steps: int = 600, vision_pretrain_lr: float = 1e-3,
                  vision_pretrain_subjects: int = 0, vision_pretrain_batch_size: int = PRETRAIN_BATCH_SIZE,
                  vision_tower: str = "resnet", seed: int = 0) -> dict:
    """Everything a tiny base is built from: equal manifests, equal bases. The world counts by what it
    is (its generator version, size and seed), not only by where it is: a world regenerated in place
    by a newer generator makes the base stale."""
    if not isinstance(vision_pretrain_batch_size, int) or vision_pretrain_batch_size < 1:
        raise ValueError(f"vision_pretrain_batch_size={vision_pretrain_batch_size}: expected a positive number of images")
    if vision_tower not in VISION_TOWERS:
        raise ValueError(f"vision_tower={vision_tower!r}: expected one of {VISION_TOWERS}")
    if vision_pretrain_subjects < 0:
        raise ValueError(f"vision_pretrain_subjects={vision_pretrain_subjects}: expected 0 (the world's train split) "
                         "or a number of subjects to draw")
    known = DEFAULT_RESNET if vision_tower == "resnet" else SiglipVisionConfig().to_dict()
    unknown = sorted(set(vision or {}) - set(known))
    if unknown:
        other = "siglip" if vision_tower == "resnet" else "resnet"
        raise ValueError(f"vision={vision}: a {vision_tower} tower has no settings {unknown} (settings of a {other} tower? "
                         f"set vision_tower={other})")
    world = Path(world)
    built = json.loads((world / "world.json").read_text()) if (world / "world.json").is_file() else {}
    return {
        "world": str(world.resolve()),
        "world_generator": {key: built.get(key) for key in ("generator_version", "subjects", "seed")},
        "vision_tower": vision_tower,
        "vision_layer": TINY_BASE_LAYERS[vision_tower],
        # As JSON reads it back (tuples as lists), so a built base's manifest compares equal.
        "vision": json.loads(json.dumps({**(DEFAULT_RESNET if vision_tower == "resnet" else DEFAULT_VISION),
                                         **(vision or {})})),
        "llm": {**DEFAULT_LLM, **(llm or {})},
        "vocab_size": vocab_size,
        "vision_pretrain_steps": vision_pretrain_steps,
        "vision_pretrain_lr": vision_pretrain_lr,
        "vision_pretrain_batch_size": vision_pretrain_batch_size,
        # 0: the world's train split; N: a population of N subjects drawn for pretraining alone.
        "vision_pretrain_subjects": vision_pretrain_subjects,
        # How the pretraining head reads the tokens (pretrain_vision_tower): the mean, for both families. The mean
        # of the tokens is what a head of the LLM attending evenly to an image sees, and a ResNet pretrained on it
        # gives the demo's difference questions far more right than one pretrained on each token's largest
        # logit (docs/results.md, 2026-12-05); ResNet bases built before this key existed used the max.
        "vision_pretrain_pool": "mean",
        "seed": seed,
    }


def build_tiny_base(out: str | Path, world: str | Path, **options) -> Path:
    """Builds the tiny base into ``out`` (atomically: a temp directory renamed into place)."""
    out, world = Path(out), Path(world)
    manifest = base_manifest(world, **options)
    vision, resnet = manifest["vision"], manifest["vision_tower"] == "resnet"
    processor = SiglipImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]})
    size = vision["image_size"]
    mean, std = (RESNET_NORMALISATION, RESNET_NORMALISATION) if resnet else (processor.image_mean, processor.image_std)
    # Drawn first, in forked workers, while this process has started no thread pools yet.
    if manifest["vision_pretrain_subjects"]:
        drawn_seed = manifest["seed"] + DRAWN_SEED_OFFSET
        if manifest["world_generator"]["seed"] == drawn_seed:
            raise ValueError(f"the world {world} was drawn with seed {drawn_seed}, the seed of the population the tower "
                             "would be pretrained on (its test split included): build the base with another seed")
        pixels, targets = drawn_pretraining_set(manifest["vision_pretrain_subjects"], drawn_seed, size, mean, std)
    else:
        pixels, targets = world_pretraining_set(world, size, mean, std)
    torch.manual_seed(manifest["seed"])
    with atomic_directory(out) as staging:
        tokenizer = train_tokenizer(world_corpus(world), manifest["vocab_size"])
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **manifest["llm"],
        )
        Qwen2ForCausalLM(config).save_pretrained(staging / "llm")
        tokenizer.save_pretrained(staging / "llm")

        if resnet:
            tower = resnet_tower(vision)
            reading = resnet_tokens
        else:
            tower = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **vision))
            reading = siglip_tokens
        manifest["vision_pretrain_loss"] = pretrain_vision_tower(
            tower, pixels, targets, manifest["vision_pretrain_steps"], manifest["seed"], manifest["vision_pretrain_lr"],
            manifest["vision_pretrain_batch_size"], tokens=reading, pool=manifest["vision_pretrain_pool"],
        )
        if resnet:
            save_for_hf(tower.eval(), str(staging / "vision_tower"), model_args=resnet_arguments(vision),
                        safe_serialization=True)
        else:
            tower.save_pretrained(staging / "vision_tower")
            processor.save_pretrained(staging / "vision_tower")

        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def ensure_tiny_base(out: str | Path, world: str | Path, **options) -> Path:
    """Builds the tiny base unless ``out`` already holds one built from the same world and options."""
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.is_file():
        built = json.loads(manifest.read_text())
        built.pop("vision_pretrain_loss", None)
        # A base built before these options existed was built with the values below: the learning rate and
        # the drawn population it had then (the same tower as today's defaults), and batches of 64.
        built.setdefault("vision_pretrain_lr", 1e-3)
        built.setdefault("vision_pretrain_subjects", 0)
        built.setdefault("vision_pretrain_batch_size", 64)
        built.setdefault("vision_tower", "siglip")
        built.setdefault("vision_pretrain_pool", "max" if built["vision_tower"] == "resnet" else "mean")
        built.setdefault("vision_layer", TINY_BASE_LAYERS[built["vision_tower"]])
        if built == base_manifest(world, **options):
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a tiny base built by lumen (no {MANIFEST}); choose another path")
    return build_tiny_base(out, world, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, type=Path, help="synthetic world directory (python -m datamodules.synthetic)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-pretrain-steps", type=int, default=600)
    parser.add_argument("--vision-pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--vision-pretrain-batch-size", type=int, default=PRETRAIN_BATCH_SIZE)
    parser.add_argument("--vision-tower", choices=VISION_TOWERS, default="resnet",
                        help="the tower's family: a small timm ResNet, or NVILA's kind, a SigLIP ViT")
    parser.add_argument("--vision-pretrain-subjects", type=int, default=0,
                        help="pretrain the tower on this many subjects drawn for it alone (0: the world's train split)")
    args = parser.parse_args()
    path = ensure_tiny_base(args.out, args.world, seed=args.seed, vision_pretrain_steps=args.vision_pretrain_steps,
                            vision_pretrain_lr=args.vision_pretrain_lr,
                            vision_pretrain_batch_size=args.vision_pretrain_batch_size,
                            vision_pretrain_subjects=args.vision_pretrain_subjects, vision_tower=args.vision_tower)
    print(f"tiny base model in {path}")


if __name__ == "__main__":
    main()
