"""Tiny vision-tower directories in each family's real on-disk format, for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel,
)

IMAGE_SIZE = 32
PATCH = 8
WIDTH = 16
DEPTH = 3


def write_siglip(out: Path, seed: int = 0) -> SiglipVisionModel:
    """A SigLIP vision tower as NVILA ships it: ``SiglipVisionModel`` + ``preprocessor_config.json``."""
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )).eval()
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
    }))
    return model


def write_clip(out: Path, seed: int = 0) -> CLIPVisionModel:
    """A CLIP vision tower (``CLIPVisionModel``): a CLS token, and a norm before its encoder."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )).eval()
    with torch.no_grad():  # a pre-encoder norm that is not the identity, so that skipping it shows
        model.pre_layrnorm.weight.uniform_(0.5, 1.5)
        model.pre_layrnorm.bias.normal_(0, 0.5)
    model.save_pretrained(out)
    return model


def write_dinov2(out: Path, seed: int = 0) -> Dinov2Model:
    """A RAD-DINO-style tower: a Hugging Face Dinov2 ViT with a CLS token."""
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH,
    )).eval()
    model.save_pretrained(out)
    return model


def write_timm(out: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=2, num_classes=0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    return model


def write_resnet(out: Path, seed: int = 0) -> torch.nn.Module:
    """A small timm ResNet (one basic block per stage) in timm's local-dir format: a convnet without
    ``blocks`` or ``stages``, whose stages are the modules ``layer1``...``layer4``."""
    torch.manual_seed(seed)
    args = dict(layers=[1, 1, 1, 1], channels=[8, 8, WIDTH, WIDTH], num_classes=0, global_pool="")
    model = timm.create_model("resnet18", pretrained=False, **args,
                              pretrained_cfg_overlay=dict(input_size=(3, IMAGE_SIZE, IMAGE_SIZE))).eval()
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)
    return model


def write_open_clip(out: Path, seed: int = 0) -> torch.nn.Module:
    """An open_clip checkpoint directory (config + weights of both towers), as on the Hugging Face Hub."""
    import open_clip

    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": DEPTH, "width": WIDTH, "head_width": 8, "patch_size": PATCH},
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(**model_cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    return model
