"""Evaluation on several processes: eval.py's throughput with 1 and 2 processes on this machine's CPU
(the baseline is 1 process on one core, as one GPU is one device; the goal is at least 1.7x its answers/s
with 2 processes on a core each), and the per-GPU memory NVILA-8B LUMEN needs to generate with the KV
cache at the evaluation batch size, in bf16 and in float32.

    python train.py                                                   # the demo checkpoint
    python -m bench.eval_processes --ckpt outputs/<date>/<time>/checkpoints/last.ckpt
    python -m bench.eval_processes --plan-only --batch 16 --text-tokens 256 --new-tokens 256

Throughput: ``python eval.py`` on the first ``--samples`` test questions from an empty run directory
each: with ``trainer.devices=1`` on one core (``OMP_NUM_THREADS=1``, the baseline: one device), with
``trainer.devices=2`` on one core each, and with ``trainer.devices=1`` on all the cores as its threads
(what one process makes of the whole machine, for the second ratio). "Generation" is the time
eval.py logs for generating ("generated N answers in S s"), from when every process is ready to when
every answer is written; "end to end" is the command's wall time, start-up, data loading and scoring
included, which a second process does not shorten.

Memory: NVILA-8B's shapes built on the meta device (``bench.memory.NVILA_8B``), counted for inference
on one GPU in eval.py's two precisions (``precision=bf16-true``, and ``32-true``: the float32 weights
experiment=lumen trains and saves): the weights; the KV cache (per sample, every layer's keys and values for the prompt, the
visual tokens of both images as the fusion lays them out, and ``--new-tokens`` answer tokens); and the
largest transient of the prefill, the decoder layer's SwiGLU MLP (gate, up, their SiLU product) or the
vision tower's widest layer over the batch's images, whichever is larger, plus the last position's fp32
logits. A count of tensors: the CUDA context and the allocator's fragmentation come on top.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, SiglipVisionConfig

from bench.memory import GB, NVILA_8B, Shapes, build_model

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(r"generated (\d+) answers? in ([\d.]+) s")


def run_eval(ckpt: Path, processes: int, threads: int, samples: int, batch: int, out: Path) -> tuple[float, float]:
    """(generation seconds as eval.py logs them, wall seconds) of one eval.py run."""
    command = [sys.executable, "eval.py", f"ckpt={ckpt}", "accelerator=cpu", f"trainer.devices={processes}",
               f"data.limit.test={samples}", f"data.eval_batch_size={batch}", f"hydra.run.dir={out}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"eval.py failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    found = GENERATED.findall(result.stdout + result.stderr)
    if not found or int(found[-1][0]) != samples:
        sys.exit(f"eval.py did not say it generated {samples} answers:\n{(result.stdout + result.stderr)[-3000:]}")
    return float(found[-1][1]), wall


def throughput(ckpt: Path, samples: int, batch: int) -> None:
    cores = os.cpu_count() or 1
    runs = [(1, 1), (2, 1), (1, cores)]  # (processes, threads each)
    measured = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-processes-") as work:
        run_eval(ckpt, 1, 1, samples, batch, Path(work) / "warm-up")  # files cached, libraries loaded
        for processes, threads in runs:
            measured[processes, threads] = run_eval(ckpt, processes, threads, samples, batch,
                                                    Path(work) / f"{processes}x{threads}")
    print(f"\n{samples} test questions, batches of {batch}, {cores} CPU cores, checkpoint {ckpt}\n")
    print("| processes x threads | generation (s) | answers/s | vs 1 x 1 | vs 1 x all cores | end to end (s) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    one_core, all_cores = measured[1, 1][0], measured[1, cores][0]
    for (processes, threads), (generation, wall) in measured.items():
        print(f"| {processes} x {threads} | {generation:.1f} | {samples / generation:.1f} | "
              f"{one_core / generation:.2f}x | {all_cores / generation:.2f}x | {wall:.1f} |")


def inference_plan(shapes: Shapes, batch: int, text_tokens: int, new_tokens: int, width: int) -> dict[str, float]:
    """Bytes per GPU of generation in ``width``-byte floats for a batch of two-image samples (module docstring)."""
    with torch.device("meta"):
        model = build_model(shapes, checkpointing=False)
    llm, vision = Qwen2Config(**shapes.llm), SiglipVisionConfig(**shapes.vision)
    visual = model.tokens_per_image * model.fusion.slots
    prompt = visual + text_tokens
    head_dim = llm.hidden_size // llm.num_attention_heads
    kv_per_token = 2 * llm.num_hidden_layers * llm.num_key_value_heads * head_dim * width
    vision_tokens = (vision.image_size // vision.patch_size) ** 2
    mlp = batch * prompt * (3 * llm.intermediate_size + 2 * llm.hidden_size) * width
    tower = 2 * batch * vision_tokens * (vision.intermediate_size * 2 + vision.hidden_size * 4) * width
    return {
        "weights": sum(p.numel() for p in model.parameters()) * width,
        "KV cache": batch * (prompt + new_tokens) * kv_per_token,
        "prefill transient": max(mlp, tower) + batch * llm.vocab_size * 4,
        "prompt tokens per sample": prompt,
    }


def print_plan(batch: int, text_tokens: int, new_tokens: int) -> None:
    plans = {name: inference_plan(NVILA_8B, batch, text_tokens, new_tokens, width)
             for name, width in (("precision=bf16-true", 2), ("precision=32-true", 4))}
    tokens = next(iter(plans.values()))["prompt tokens per sample"]
    for plan in plans.values():
        del plan["prompt tokens per sample"]
    print(f"\nNVILA-8B LUMEN generating, per GPU: batch {batch}, {tokens} prompt tokens per sample "
          f"({tokens - text_tokens} visual, both images; {text_tokens} text), up to {new_tokens} new tokens\n")
    print(f"| part | {' | '.join(plans)} |\n| --- |{' ---: |' * len(plans)}")
    for part in next(iter(plans.values())):
        print(f"| {part} | {' | '.join(f'{plan[part] / GB:.2f} GB' for plan in plans.values())} |")
    print(f"| **total** | {' | '.join(f'**{sum(plan.values()) / GB:.2f} GB**' for plan in plans.values())} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a checkpoint from train.py (or an export)")
    parser.add_argument("--samples", type=int, default=900, help="test questions (the demo world has 910)")
    parser.add_argument("--eval-batch", type=int, default=16, help="eval.py's batch size for the throughput runs")
    parser.add_argument("--batch", type=int, default=16, help="the memory plan's batch (experiment=lumen's)")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256, help="experiment=lumen's max_new_tokens")
    parser.add_argument("--plan-only", action="store_true", help="the memory plan alone")
    args = parser.parse_args()
    if not args.plan_only:
        if args.ckpt is None:
            parser.error("--ckpt is required (or --plan-only)")
        throughput(args.ckpt, args.samples, args.eval_batch)
    print_plan(args.batch, args.text_tokens, args.new_tokens)


if __name__ == "__main__":
    main()
