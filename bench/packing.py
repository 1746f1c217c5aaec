"""Padded vs packed micro-batches: the fraction of real (non-pad) tokens and the training-step throughput.

On the demo's synthetic world and tiny base (built and cached as ``python train.py`` does), the
training sampler's micro-batches (length-grouped as configured) are collated both ways: padded rows
(data.packing=false, the baseline) and one packed row with block-causal attention (data.packing=true).
Two copies of the model, from the same weights, each take full training steps (forward, backward,
AdamW) on the same samples; the layouts alternate batch by batch, and which goes first alternates too,
so that load on the machine falls on both alike. After --warmup steps, --steps steps are timed, and
Lightning's Throughput turns the step times into samples/s and tokens/s (real tokens only). The first
step's two losses are printed as a check that both layouts compute the same thing.

    python -m bench.packing                                   # CPU, 3-4 minutes on 2 busy cores
    python -m bench.packing --group-batches 1                 # micro-batches not grouped by length
    python -m bench.packing --device cuda                     # on a GPU (sdpa: a dense block-causal mask)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.throughput import Throughput
from omegaconf import OmegaConf

from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.lit_module import BATCH_INPUTS, PACKED_INPUTS
from run.cli import compose_config, prepare
from run.train import instantiate_data

ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = ("padded", "packed")


def training_step(model, optimizer, batch: dict, device: str) -> tuple[float, float]:
    """One optimizer step; returns (seconds, loss)."""
    inputs = {key: batch[key].to(device) if torch.is_tensor(batch[key]) else batch[key]
              for key in (*BATCH_INPUTS, *PACKED_INPUTS, "labels") if key in batch}
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16, help="samples per micro-batch (the demo's data.batch_size)")
    parser.add_argument("--group-batches", type=int, default=32,
                        help="the sampler's length grouping (data.group_batches; 1 = none)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--subjects", type=int, default=400, help="the synthetic world's size (the demo's: 400)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LUMEN_CACHE", ROOT / ".cache" / "lumen")),
                        help="where the demo's world and tiny base are (built there if absent)")
    args = parser.parse_args()

    cfg = compose_config("train", [f"paths.cache_dir={args.cache_dir}", f"paths.output_dir={tempfile.mkdtemp()}", "data=diffvqa",
                                   f"prepare.world.subjects={args.subjects}", f"data.batch_size={args.batch_size}",
                                   f"data.group_batches={args.group_batches}"])
    prepare(cfg)
    net = ModelConfig(**cfg.model.net)
    spec = input_spec(net)
    loaders = {}
    for layout in LAYOUTS:
        OmegaConf.update(cfg, "data.packing", layout == "packed")
        loaders[layout] = iter(instantiate_data(cfg, spec).train_dataloader())
    steps = args.warmup + args.steps
    batches = {layout: [next(loaders[layout]) for _ in range(steps)] for layout in LAYOUTS}
    assert all(a["sample_ids"] == b["sample_ids"] for a, b in zip(batches["padded"], batches["packed"]))

    torch.manual_seed(0)
    model = build_model(net).train().to(args.device)
    models = {"padded": model, "packed": copy.deepcopy(model)}
    optimizers = {layout: torch.optim.AdamW(models[layout].parameters(), lr=1e-4) for layout in LAYOUTS}
    meters = {layout: Throughput(window_size=args.steps + 1) for layout in LAYOUTS}
    totals = {layout: {"time": 0.0, "samples": 0, "tokens": 0, "computed": 0, "longest": 0} for layout in LAYOUTS}
    first_loss = {}
    for step in range(steps):
        order = LAYOUTS if step % 2 == 0 else LAYOUTS[::-1]
        for layout in order:
            batch = batches[layout][step]
            seconds, loss = training_step(models[layout], optimizers[layout], batch, args.device)
            first_loss.setdefault(layout, loss)
            if step < args.warmup:
                continue
            total = totals[layout]
            if step == args.warmup:
                meters[layout].update(time=0.0, batches=0, samples=0, lengths=0)
            total["time"] += seconds
            total["samples"] += len(batch["sample_ids"])
            total["tokens"] += int(batch["attention_mask"].sum())
            total["computed"] += batch["input_ids"].numel()
            total["longest"] = max(total["longest"], batch["input_ids"].numel())
            meters[layout].update(time=total["time"], batches=step - args.warmup + 1, samples=total["samples"],
                                  lengths=total["tokens"])

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.steps} timed training steps per layout after {args.warmup} warm-up, {args.batch_size} samples per "
          f"micro-batch (the same samples in both), group_batches={args.group_batches}, "
          f"attention={net.attn_implementation}, {device}")
    print(f"first-step loss: padded {first_loss['padded']:.6f}, packed {first_loss['packed']:.6f}")
    # real tokens: the fraction of computed positions that are not padding; tokens/step: positions computed
    # per micro-batch, mean and most (the latter sets peak activation memory).
    print(f"{'layout':<16}{'real tokens':>12}{'tokens/step':>13}{'most':>7}{'tokens/s':>11}{'samples/s':>11}")
    rates = {}
    for layout in LAYOUTS:
        metrics, total = meters[layout].compute(), totals[layout]
        rates[layout] = (metrics["device/items_per_sec"], metrics["device/samples_per_sec"])
        print(f"{layout:<16}{total['tokens'] / total['computed']:>12.3f}{total['computed'] / args.steps:>13.0f}"
              f"{total['longest']:>7}{rates[layout][0]:>11.0f}{rates[layout][1]:>11.1f}")
    print(f"{'packed / padded':<48}{rates['packed'][0] / rates['padded'][0]:>10.2f}x"
          f"{rates['packed'][1] / rates['padded'][1]:>10.2f}x")


if __name__ == "__main__":
    main()
