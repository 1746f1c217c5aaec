"""Per-GPU memory of a LUMEN training step under FSDP2, predicted from the model's shapes; the prediction
is checked against the measured peak of tiny models trained on CPU.

    python -m bench.memory                              # NVILA-8B LUMEN on 4 GPUs, then the tiny-model check
    python -m bench.memory --gpus 8 --micro-batch 2 --text-tokens 512 --no-check

The plan (``plan``): the model is built on the meta device from NVILA-8B's shapes (Qwen2-7B LLM, SigLIP
so400m read at its second-to-last layer, NVILA's 2x2-merge projector on three scales, the temporal
fusion), so parameter counts are exact and per FSDP unit. Per GPU, with FSDP2 full sharding over N GPUs:

- parameters: fp32 master weights (``model.net.dtype=float32``), sharded: 4 P / N bytes;
- gradients: fp32, sharded: 4 T / N (T = trainable parameters); AdamW state, two fp32 tensors: 8 T / N;
  torch's foreach AdamW step makes one more fp32 temporary of the sharded size (4 T / N);
- gathered parameters in ``model.fsdp.param_dtype`` (bf16): the root unit (token embeddings, LM head),
  which FSDP2 keeps unsharded from forward to backward, plus the unit being computed and the prefetched
  one; in backward the unit's unsharded gradients (bf16, and fp32 for the reduce-scatter);
- activations kept for backward, counted per token from the tensors each op saves (Hugging Face's Qwen2
  and SigLIP layers, our projector and fusion); with activation checkpointing only each block's input is
  kept and one block at a time is recomputed;
- logits and loss: the fp32 log-softmax (kept) and, at the start of backward, its gradient and the
  gradient of its input: 12 bytes per vocabulary entry per target token (LumenModel runs the LM head at
  target positions only; the plan takes every text token as a target).

The peak is the larger of the start of backward (all activations, the logits' gradients; the sharded
gradients too when micro-batches are accumulated) and the optimizer step (states, gradients, temporary).
It counts tensors: the CUDA context, NCCL's buffers and the caching allocator's fragmentation come on
top, so leave 10 GB or more of an 80 GB GPU free.

The check (``measure``): tiny models built the same way are trained for a few steps on CPU under FSDP2
(gloo, 1 or 2 processes, bf16 compute) inside torch's profiler with ``profile_memory``, which records
every allocation and free of a tensor's storage with its size; replaying them gives the bytes of live
tensors at every moment (on CPU there is no caching allocator), not the process's RSS with its
allocator and library noise. (It agrees to the byte with the profiler's own memory timeline,
``export_memory_timeline``, which is much slower.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._C._profiler import _EventType
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from models.fusion import TemporalFusion
from models.lit_module import parameter_groups
from models.lumen import LumenModel
from models.parallel import apply_activation_checkpointing, shard
from models.projector import MLPDownsampleProjector
from models.vision import HFVisionTower

GB = 1e9


@dataclass(frozen=True)
class Shapes:
    """A LUMEN model's architecture: Hugging Face Qwen2 and SigLIP config fields, the tower's layer,
    NVILA's projector scales and the fusion mode."""

    llm: dict
    vision: dict
    vision_layer: int = -2
    scales: int = 1
    fusion_mode: str = "difference"


# NVILA-8B's llm/ and vision_tower/ configs: Qwen2 (from Qwen2.5-7B-Instruct) with its stored 151,648-row
# vocabulary, untied; SigLIP so400m at 448 px, read at its second-to-last layer; mm_projector
# mlp_downsample over three scales (mm_hidden_size 3456 = 3 x 1152: one 448 tile per image, its
# features repeated per scale, as models/projector.py does for multi-image prompts).
NVILA_8B = Shapes(
    llm=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             intermediate_size=18944, vocab_size=151648, tie_word_embeddings=False),
    vision=dict(image_size=448, patch_size=14, hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                intermediate_size=4304),
    scales=3,
)


@dataclass(frozen=True)
class Workload:
    """One micro-batch: ``micro_batch`` samples, each ``text_tokens`` of text and ``images`` images
    (2 = current and prior)."""

    micro_batch: int = 4
    text_tokens: int = 256
    images: int = 2


@dataclass(frozen=True)
class Setup:
    """How the step runs: GPUs (FSDP2 shards), compute dtype bytes (2 = bf16), checkpointing, flash
    attention (its output is saved once; SDPA's transposed output is copied once more) and gradient
    accumulation (the sharded gradients then live through the backward of later micro-batches)."""

    gpus: int = 4
    compute_bytes: int = 2
    checkpointing: bool = True
    flash_attention: bool = True
    accumulation: int = 8


def build_model(shapes: Shapes, checkpointing: bool) -> LumenModel:
    """The LUMEN model of these shapes with fresh weights (on the current default device: ``meta`` for
    the plan), checkpointed as training checkpoints it (``models.parallel.apply_activation_checkpointing``)."""
    llm = Qwen2ForCausalLM(Qwen2Config(**shapes.llm, attn_implementation="sdpa"))
    tower = SiglipVisionModel(SiglipVisionConfig(**shapes.vision, attn_implementation="sdpa"))
    vision = HFVisionTower(tower, shapes.vision_layer, Path("bench/memory.py"))
    dim = llm.config.hidden_size
    projector = MLPDownsampleProjector(vision.grid, vision.hidden_size, dim, "mlp_downsample", scales=shapes.scales)
    fusion = TemporalFusion(dim, projector.tokens_per_image, mode=shapes.fusion_mode)
    model = LumenModel(vision, projector, fusion, llm, image_token_id=shapes.llm["vocab_size"] - 1)
    if checkpointing:
        apply_activation_checkpointing(model)
    return model


def _count(parameters) -> tuple[int, int]:
    parameters = list(parameters)
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def fsdp_units(model: LumenModel) -> dict[str, tuple[int, int]]:
    """(parameters, trainable) of the largest unit of each kind ``models.parallel.shard`` makes, and of
    the root (what no other unit holds: the LLM's embeddings, LM head and final norm)."""
    blocks = list(model.vision.blocks)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    units = {
        "vision block": max((_count(block.parameters()) for block in blocks), key=lambda count: count[0]),
        # The tower's embeddings and its unused (frozen) final norm and pooling head.
        "vision rest": _count(p for p in model.vision.parameters() if id(p) not in in_blocks),
        "decoder layer": max((_count(layer.parameters()) for layer in model.llm.model.layers), key=lambda c: c[0]),
        "projector": _count(model.projector.parameters()),
        "fusion": _count(model.fusion.parameters()),
    }
    outside = {id(p) for part in (model.vision, model.llm.model.layers, model.projector, model.fusion)
               for p in part.parameters()}
    units["root"] = _count(p for p in model.parameters() if id(p) not in outside)
    return units


def llm_layer_bytes(config: Qwen2Config, a: int, flash: bool) -> float:
    """Bytes a Qwen2 decoder layer keeps for backward per token, computing in ``a``-byte floats.

    Each RMSNorm keeps its input upcast to fp32 (4h), the normalised value cast back (a h) and its output
    (a h, the next Linear's input); attention keeps q and k after RoPE, v (GQA: hkv wide), the
    attention output (twice with SDPA: its own and the transposed copy o_proj reads) and the softmax
    log-sum-exp (fp32 per head); the SwiGLU MLP keeps gate, SiLU(gate), up and their product (4 a i)."""
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv = config.num_key_value_heads * (h // heads)
    norms = 2 * (4 * h + 2 * a * h + 4)
    attention = a * (h + 2 * kv) + a * h * (1 if flash else 2) + 4 * heads
    return norms + attention + 4 * a * i


def vision_layer_bytes(config: SiglipVisionConfig, a: int) -> float:
    """Bytes a SigLIP encoder layer keeps per token: LayerNorm inputs and outputs (+ fp32 mean and
    rstd), q, k, v, the attention output and its transposed copy, the log-sum-exp, the MLP's two wide
    tensors (fc1 output, GELU output)."""
    hv, iv, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    return 9 * a * hv + 2 * a * iv + 16 + 4 * heads


def tokens_per_micro_batch(model: LumenModel, work: Workload) -> int:
    """LLM tokens of a micro-batch: per sample, the visual tokens (the fusion's token sets of
    ``tokens_per_image`` each, as the collator lays them out) and the text."""
    visual = model.tokens_per_image * (model.fusion.slots if work.images > 1 else 1)
    return work.micro_batch * (visual + work.text_tokens)


def activation_plan(model: LumenModel, work: Workload, setup: Setup) -> dict[str, float]:
    """Bytes kept for backward by each part for one micro-batch, the recomputed block (checkpointing),
    and the logits/loss transient at the start of backward."""
    a, llm, tower = setup.compute_bytes, model.llm.config, model.vision.model.config
    images = work.micro_batch * work.images
    patches = model.vision.grid[0] * model.vision.grid[1]
    tokens = tokens_per_micro_batch(model, work)
    dim, merged = llm.hidden_size, model.projector.mm_hidden_size * patches  # merged: channels per image
    layer = llm_layer_bytes(llm, a, setup.flash_attention) * tokens
    block = vision_layer_bytes(tower, a) * patches * images
    layers, blocks = llm.num_hidden_layers, len(model.vision.blocks)
    plan = {
        # Checkpointed, a block keeps only its input; without, everything its ops save.
        "vision tower": blocks * (a * tower.hidden_size * patches * images if setup.checkpointing else block),
        # Merged tokens and LayerNorm output (a x channels), GELU input and output (a x D), per image.
        "projector": images * (2 * a * merged + 2 * a * model.tokens_per_image * dim),
        # The difference branch keeps 14 token sets of N x D per sample (attention in/out, norm, MLP).
        "fusion": 0 if model.fusion.mode == "concat" else 14 * a * work.micro_batch * model.tokens_per_image * dim,
        "LLM": layers * (a * dim * tokens if setup.checkpointing else layer) + (4 * dim + 2 * a * dim) * tokens,
        "recomputed block": max(layer, block) if setup.checkpointing else 0,
        # LumenModel computes the LM head and the loss at target positions only (every text token here).
        "logits and loss": 12 * llm.vocab_size * work.micro_batch * work.text_tokens,
    }
    return plan


def plan(shapes: Shapes, work: Workload, setup: Setup) -> dict[str, float]:
    """Per-GPU bytes of each part of a training step, and the peak (see the module docstring)."""
    with torch.device("meta"):
        model = build_model(shapes, setup.checkpointing)
    total, trainable = _count(model.parameters())
    units = fsdp_units(model)
    block = max(count for kind, count in units.items() if kind != "root")
    n, p = setup.gpus, setup.compute_bytes
    pixels = work.micro_batch * work.images * 3 * model.vision.model.config.image_size ** 2
    parts = {
        "batch": 4 * pixels + 3 * 8 * tokens_per_micro_batch(model, work),  # fp32 pixels; ids, mask, labels
        "parameters": 4 * total / n,
        "gradients": 4 * trainable / n,
        "optimizer state": 8 * trainable / n,
        "optimizer step temporary": 4 * trainable / n,
        "gathered parameters": p * (units["root"][0] + 2 * block[0]),
        "unsharded gradients": p * units["root"][1] + (p + 4) * block[1],
    }
    activations = activation_plan(model, work, setup)
    kept = sum(v for k, v in activations.items() if k not in ("recomputed block", "logits and loss"))
    static = parts["batch"] + parts["parameters"] + parts["optimizer state"]
    gradients = parts["gradients"] if setup.accumulation > 1 else 0
    backward_start = static + gradients + parts["gathered parameters"] + kept + activations["logits and loss"]
    in_blocks = (static + gradients + parts["gathered parameters"] + parts["unsharded gradients"] + kept
                 + activations["recomputed block"])
    step = static + parts["gradients"] + parts["optimizer step temporary"]
    return {**parts, **{f"activations: {k}": v for k, v in activations.items()},
            "peak: start of backward": backward_start, "peak: inside a block's backward": in_blocks,
            "peak: optimizer step": step, "peak": max(backward_start, in_blocks, step),
            "_parameters": total, "_trainable": trainable}


# Tiny models for the check: small enough for a CPU, with the same structure as NVILA-8B LUMEN.
TINY = Shapes(
    llm=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, vocab_size=512, tie_word_embeddings=False),
    vision=dict(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=128),
)
SMALL = Shapes(
    llm=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=352, vocab_size=2048, tie_word_embeddings=False),
    vision=dict(image_size=112, patch_size=8, hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=256),
)
# (name, shapes, workload, setup): checkpointing off and on, two sizes, one and two processes,
# accumulation, SDPA on CPU (no flash attention).
CPU = dict(gpus=1, flash_attention=False, accumulation=1)
CHECKS = [
    ("tiny", TINY, Workload(4, 48), Setup(**CPU, checkpointing=False)),
    ("tiny, checkpointing", TINY, Workload(4, 48), Setup(**CPU, checkpointing=True)),
    ("small", SMALL, Workload(4, 96), Setup(**CPU, checkpointing=False)),
    ("small, checkpointing", SMALL, Workload(4, 96), Setup(**CPU, checkpointing=True)),
    ("small, 2 processes", SMALL, Workload(4, 96), Setup(**CPU | {"gpus": 2}, checkpointing=False)),
    ("small, 2 processes, accumulation 2", SMALL, Workload(4, 96),
     Setup(**CPU | {"gpus": 2, "accumulation": 2}, checkpointing=True)),
]


def make_batch(model: LumenModel, work: Workload, generator: torch.Generator) -> dict:
    """A micro-batch of ``work``'s shape: every sample with a prior (``work.images == 2``), its visual
    tokens first, then text; labels on the text."""
    batch, size = work.micro_batch, model.vision.model.config.image_size
    visual = model.tokens_per_image * (model.fusion.slots if work.images > 1 else 1)
    vocab = model.llm.config.vocab_size - 1  # the last id is the image token
    text = torch.randint(0, vocab, (batch, work.text_tokens), generator=generator)
    input_ids = torch.cat([torch.full((batch, visual), model.image_token_id), text], dim=1)
    labels = torch.cat([torch.full((batch, visual), -100), text], dim=1)
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
        "current_images": torch.randn(batch, 3, size, size, generator=generator),
        "prior_images": torch.randn(batch * (work.images - 1), 3, size, size, generator=generator),
        "has_prior": torch.full((batch,), work.images > 1), "interval_days": torch.full((batch,), 30.0),
    }


def profile_steps(shapes: Shapes, work: Workload, setup: Setup, rank: int = 0) -> dict[str, int]:
    """In a process of an initialised gloo group of ``setup.gpus``: builds, shards (bf16 compute, fp32
    gradient reduction), trains three optimizer steps inside the profiler and returns the live tensor
    bytes at the start of step 2 and at the peak of steps 2-3 (step 1 creates the optimizer state).

    It runs on one thread: CPU kernels allocate scratch buffers per thread (SDPA's flash kernel on CPU
    does, for every head block it works on), which a GPU does not and the plan does not count, so with
    more threads the peak would grow with the machine's cores (16 threads: +1.2 MB, +22% on ``TINY``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile_steps(shapes, work, setup, rank)
    finally:
        torch.set_num_threads(threads)


def _profile_steps(shapes: Shapes, work: Workload, setup: Setup, rank: int) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(shapes, setup.checkpointing).train()
        shard(model, init_device_mesh("cpu", (setup.gpus,)), torch.bfloat16 if setup.compute_bytes == 2 else None)
        optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-4, weight_decay=0.0))
        batch = make_batch(model, work, torch.Generator().manual_seed(rank))
        for step in range(3):
            with record_function(f"step {step}"):
                for _ in range(setup.accumulation):
                    model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    return live_bytes(prof, ("step 1", "step 2"))


def _measure_process(rank: int, port: int, shapes: Shapes, work: Workload, setup: Setup, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=setup.gpus)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    try:
        (Path(out) / f"memory-{rank}.json").write_text(json.dumps(profile_steps(shapes, work, setup, rank)))
    finally:
        dist.destroy_process_group()


def live_bytes(prof: profile, windows: tuple[str, ...]) -> dict[str, int]:
    """Replays the profile's allocations and frees (``profile_memory`` records each with its signed size)
    in time order. Returns the bytes alive when the first named ``record_function`` range starts
    (parameters, optimizer state, the batch) and the most alive at once inside the ranges. Everything is
    allocated inside the profile, so the running sum is the bytes of all live tensors."""
    allocations, ranges, events = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        elif event.name in windows:
            ranges.append((event.start_time_ns, event.end_time_ns))
    first = min(start for start, _ in ranges)
    live, peak, at_start = 0, 0, None
    for time, size in sorted(allocations):
        if at_start is None and time >= first:
            at_start = live
        live += size
        if any(start <= time <= end for start, end in ranges):
            peak = max(peak, live)
    return {"start": at_start, "peak": peak}


def measure(shapes: Shapes, work: Workload, setup: Setup) -> dict[str, int]:
    """Rank 0's live tensor bytes at the start of a step and at the peak (``profile_steps``), in fresh
    processes."""
    with socket.socket() as probe, tempfile.TemporaryDirectory() as out:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        mp.spawn(_measure_process, args=(port, shapes, work, setup, out), nprocs=setup.gpus)
        return json.loads((Path(out) / "memory-0.json").read_text())

ROWS = ("parameters", "optimizer state", "gradients", "gathered parameters", "activations: vision tower",
        "activations: projector", "activations: fusion", "activations: LLM", "activations: recomputed block",
        "activations: logits and loss", "peak: start of backward", "peak: optimizer step", "peak")


def print_plan(shapes: Shapes, work: Workload, setup: Setup, gpu_gb: float) -> None:
    plans = {on: plan(shapes, work, replace(setup, checkpointing=on)) for on in (False, True)}
    counts = plans[True]
    visual = f"{work.images} images" if work.images > 1 else "1 image"
    print(f"NVILA-8B LUMEN ({shapes.fusion_mode} fusion): {counts['_parameters'] / 1e9:.2f}B parameters, "
          f"{counts['_trainable'] / 1e9:.2f}B trained; FSDP2 full shard over {setup.gpus} GPUs, "
          f"bf16 compute, fp32 master weights, gradients and AdamW state; micro-batch {work.micro_batch} "
          f"({visual} + {work.text_tokens} text tokens per sample), accumulation {setup.accumulation}\n")
    print("| per GPU (GB) | checkpointing off | checkpointing on |")
    print("| --- | --- | --- |")
    for row in ROWS:
        cells = [f"{plans[on][row] / GB:.1f}" for on in (False, True)]
        name = f"**{row}**" if row == "peak" else row
        print(f"| {name} | " + " | ".join(f"**{c}**" if row == "peak" else c for c in cells) + " |")
    for on in (False, True):
        headroom = gpu_gb - plans[on]["peak"] / GB
        print(f"checkpointing {'on' if on else 'off'}: {headroom:.1f} GB of {gpu_gb:.0f} GB left for the CUDA "
              "context, NCCL buffers and allocator fragmentation")


def check() -> None:
    """Predicted against measured for the tiny configurations."""
    print("\n| tiny configuration | predicted peak (MB) | measured peak (MB) | measured / predicted "
          "| predicted / measured at step start (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, shapes, work, setup in CHECKS:
        predicted = plan(shapes, work, setup)
        measured = measure(shapes, work, setup)
        at_start = predicted["batch"] + predicted["parameters"] + predicted["optimizer state"]
        print(f"| {name} | {predicted['peak'] / 1e6:.2f} | {measured['peak'] / 1e6:.2f} | "
              f"{measured['peak'] / predicted['peak']:.3f} | {at_start / 1e6:.2f} / {measured['start'] / 1e6:.2f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU (H100 SXM: 80)")
    parser.add_argument("--micro-batch", type=int, default=4, help="data.batch_size")
    parser.add_argument("--global-batch", type=int, default=128, help="data.global_batch_size")
    parser.add_argument("--text-tokens", type=int, default=256, help="text tokens per sample (prompt and answer)")
    parser.add_argument("--images", type=int, default=2, choices=(1, 2), help="images per sample (2: with the prior)")
    parser.add_argument("--fusion", default="difference", help="model.net.fusion.mode")
    parser.add_argument("--no-check", action="store_true", help="only the plan, no measurement of tiny models")
    args = parser.parse_args()
    accumulation = max(1, args.global_batch // (args.micro_batch * args.gpus))
    print_plan(replace(NVILA_8B, fusion_mode=args.fusion), Workload(args.micro_batch, args.text_tokens, args.images),
               Setup(gpus=args.gpus, accumulation=accumulation), args.gpu_gb)
    if not args.no_check:
        check()


if __name__ == "__main__":
    main()
