"""A tiny ``Efficient-Large-Model/NVILA-8B`` for the tests: its directory layout, its key names and the
fields of its top-level ``config.json`` that describe the vision path, scaled to a 32 px tower, and NVILA's
visual tokens for it, written here from NVILA's published architecture (not from our modules)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests import towers

SCALES = 3  # NVILA-8B: mm_hidden_size = 3 x the SigLIP width (448/896/1344 on channels)
LLM_WIDTH = 24
# NVILA-8B's config.json as released (transformers 4.46) for what lumen reads, its tower at 32 px instead of
# 448: dynamic S2 over three scales starting at the tower's resolution, SigLIP read at its second-to-last
# layer with every token (SigLIP has no CLS), images tiled when alone and stretched when several.
NVILA_8B_CONFIG = {
    "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": LLM_WIDTH,
    "mm_hidden_size": SCALES * towers.WIDTH, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
    "image_aspect_ratio": "dynamic_s2", "s2": False, "dynamic_s2": True,
    "s2_scales": ",".join(str(towers.IMAGE_SIZE * k) for k in range(1, SCALES + 1)),
    "s2_max_split_size": towers.IMAGE_SIZE, "s2_resize_output_to_scale_idx": -1, "vision_resolution": -1,
    "mm_projector_cfg": {"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample"},
    "llm_cfg": {"architectures": ["Qwen2ForCausalLM"]}, "vision_tower_cfg": {"architectures": ["SiglipVisionModel"]},
}


def projector_weights(in_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An ``mlp_downsample`` projector's weights under NVILA's key names."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "layers.1.weight": 1 + 0.1 * randn(in_features), "layers.1.bias": 0.1 * randn(in_features),
        "layers.2.weight": randn(LLM_WIDTH, in_features) / in_features**0.5, "layers.2.bias": 0.1 * randn(LLM_WIDTH),
        "layers.4.weight": randn(LLM_WIDTH, LLM_WIDTH) / LLM_WIDTH**0.5, "layers.4.bias": 0.1 * randn(LLM_WIDTH),
    }


def write_projector(out: Path, weights: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample",
        "model_type": "v2l_projector", "torch_dtype": "float32",
    }))


def write_nvila(root: Path, tokenizer) -> dict:
    """llm/ (a tiny Qwen2 with ``tokenizer``), vision_tower/ (SigLIP saved as transformers 4.x did),
    mm_projector/ (three scales) and config.json (``NVILA_8B_CONFIG``)."""
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=LLM_WIDTH, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=48, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    siglip = towers.write_siglip(root / "vision_tower")
    # NVILA's tower was saved by transformers 4.x, whose keys start with "vision_model.".
    weights = load_file(root / "vision_tower" / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in weights.items()}, root / "vision_tower" / "model.safetensors")
    projector = projector_weights(4 * SCALES * towers.WIDTH)
    write_projector(root / "mm_projector", projector)
    (root / "config.json").write_text(json.dumps(NVILA_8B_CONFIG))
    return {"root": root, "siglip": siglip, "llm": llm, "projector": projector, "tokenizer": tokenizer}


def variant(nvila_root: Path, out: Path, config: dict | None = None, copy: tuple[str, ...] = ()) -> Path:
    """A copy of an NVILA directory whose config.json has ``config``'s fields changed (``None`` removes a
    field): the parts named in ``copy`` are copied, to be edited; the others are links to the original."""
    out.mkdir(parents=True)
    for part in ("llm", "vision_tower", "mm_projector"):
        if part in copy:
            shutil.copytree(nvila_root / part, out / part)
        else:
            (out / part).symlink_to(nvila_root / part)
    stored = json.loads((nvila_root / "config.json").read_text())
    for field, value in (config or {}).items():
        if value is None:
            stored.pop(field)
        else:
            stored[field] = value
    (out / "config.json").write_text(json.dumps(stored))
    return out


def nvila_visual_tokens(nvila: dict, images: torch.Tensor, layer: int = -2, scales: int = SCALES) -> torch.Tensor:
    """NVILA for untiled images: SigLIP's ``hidden_states[layer]`` (every token: SigLIP has no CLS),
    repeated once per S2 scale on channels, 2x2 blocks concatenated channels-fastest, then
    LayerNorm -> Linear -> GELU -> Linear with the projector's weights."""
    with torch.no_grad():
        features = nvila["siglip"](images, output_hidden_states=True).hidden_states[layer]  # (B, 16, C)
    features = torch.cat([features] * scales, dim=-1)
    side = towers.IMAGE_SIZE // towers.PATCH
    grid = features.view(len(images), side, side, -1)
    merged = torch.stack([
        torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], -1)
        for i in range(side // 2) for j in range(side // 2)
    ], dim=1)
    w = nvila["projector"]
    hidden = F.layer_norm(merged, (merged.shape[-1],), w["layers.1.weight"], w["layers.1.bias"])
    hidden = F.gelu(F.linear(hidden, w["layers.2.weight"], w["layers.2.bias"]))
    return F.linear(hidden, w["layers.4.weight"], w["layers.4.bias"])
