"""Our training step vs Hugging Face's ``LlavaForConditionalGeneration`` built from the same tiny components.

Both models hold the same weights: a tiny base's SigLIP tower (``prepare.tiny_base.vision_tower=siglip``, read at
the same layer) and Qwen2
LLM, and the NVILA projector (2x2 token merge + MLP). Llava's own projector does not merge tokens, so
ours is put in its place (``multi_modal_projector``): the only way to give both the same visual tokens
per image and the same prompts; everything else on the Llava side -- tower call, feature selection,
splicing, LLM, loss -- is Hugging Face's. Ours also runs its temporal fusion, set as one training
process sets it: on these batches (no sample has a prior) it skips its prior branches and adds the
current-type embedding to each sample's tokens, which Llava does not have. The FLOPs, ATen operators
(all, and those a GPU would launch: ``DeviceWork``, ``ForeachOperators``) and waits for the device
(``HostSyncs``) of a step of each are printed too.

Same batches (one image per sample, as Llava has no prior image: the demo data with use_prior=false),
same dtype, same threads, AdamW with the same settings. A step is forward, loss, backward, optimizer
step and zero_grad. After --warmup steps of each, --repeats rounds alternate ours and HF (each round
--steps steps on the batches in turn); the median round gives steps/s and real tokens/s.

    python -m bench.throughput                                    # CPU, float32, all threads
    python -m bench.throughput --threads 1 --batch-size 16
    python -m bench.throughput --device cuda --dtype bfloat16
    python -m bench.throughput --fusion concat                     # the cheapest fusion
    python -m bench.throughput --profile                           # + torch.profiler's top operators of each
    python -m bench.throughput prepare.world.subjects=40           # Hydra overrides of the demo config
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import hydra
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from models.config import ModelConfig
from models.factory import build_model, input_spec
from models.flops import measure_step_flops, real_tokens
from models.lit_module import BATCH_INPUTS, parameter_groups
from models.lumen import LumenModel
from run.cli import compose_config, prepare

ROOT = Path(__file__).resolve().parents[1]


def llava_like(ours: LumenModel) -> LlavaForConditionalGeneration:
    """Llava with our tower's, projector's and LLM's weights (and our projector module, see above).

    Our tower has already dropped the layers after the one it is read at (``model.net.vision.layer``),
    so Llava reads the last layer of that tower, before the unused final norm."""
    vision_config = ours.vision.model.config
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=ours.llm.config.to_dict(),
        image_token_index=ours.image_token_id,
        projector_hidden_act="gelu",
        # SigLIP has no CLS token: every patch token is a visual token.
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(ours.vision.model.state_dict())
    llava.model.multi_modal_projector = copy.deepcopy(ours.projector)
    llava.model.language_model.load_state_dict(ours.llm.model.state_dict())
    llava.lm_head.load_state_dict(ours.llm.lm_head.state_dict())
    return llava.to(ours.llm.dtype).train()


def ours_loss(model: LumenModel, batch: dict) -> torch.Tensor:
    return model(**{key: batch[key] for key in BATCH_INPUTS}, labels=batch["labels"]).loss


def llava_loss(model: LlavaForConditionalGeneration, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["current_images"], labels=batch["labels"]).loss


def train_steps(model, loss_fn, optimizer, batches: list[dict], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps over ``batches`` in turn."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        loss_fn(model, batches[step % len(batches)]).backward()
        optimizer.step()
        optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators run under it (forward, autograd's backward, optimizer) for which
    ``counts`` holds: all of them here."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def counts(self, func, args: tuple, kwargs: dict) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += self.counts(func, args, kwargs)
        return func(*args, **kwargs)


# Operators that run nothing on the device and are not marked as views by their schema: allocations that
# write nothing, and ``_unsafe_view``.
NO_DEVICE_WORK = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                  "aten::new_empty_strided", "aten::_unsafe_view"}


class DeviceWork(OperatorCount):
    """Counts the operators that run work on the device: not views (``view``, ``slice``, ``detach``, ...)
    nor bare allocations. On a GPU each is at least one kernel launch (views and allocations cost host
    time only), and a model this small is bound by launches, not FLOPs."""

    def counts(self, func, args: tuple, kwargs: dict) -> bool:
        return not func.is_view and func._schema.name not in NO_DEVICE_WORK


class ForeachOperators(OperatorCount):
    """Counts the multi-tensor (``_foreach_*``) operators, each on a list of tensors at a time: what AdamW's
    step launches on CUDA, but for the one that adds to the step counts, which stay on the host."""

    def counts(self, func, args: tuple, kwargs: dict) -> bool:
        return func._schema.name.startswith("aten::_foreach_")


# Operators whose output size or value the host must read from the device: on a GPU each makes the CPU
# wait until the queued kernels have run (a device->host copy, e.g. ``.cpu()``, does too; on CPU there is
# none to see). ``index``/``index_put`` with a boolean mask count as well: they find its nonzero entries.
# So does ``masked_scatter``'s backward, which runs ``masked_select`` inside, out of a dispatch mode's sight.
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::equal",
              "aten::unique_consecutive", "aten::unique_dim", "aten::_unique", "aten::_unique2",
              "aten::masked_scatter_backward"}
MASK_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class HostSyncs(OperatorCount):
    """Counts the operators run under it that wait for the device (``HOST_READS``, boolean-mask
    indexing, ``repeat_interleave`` without ``output_size``). A wait stops the host from queuing work
    ahead of the GPU: the GPU idles while the next kernels are launched, and under FSDP2 the next
    layer's all-gather is issued no earlier than the wait ends. Counted on CPU, where nothing waits,
    with the operators a CUDA run dispatches too."""

    def counts(self, func, args: tuple, kwargs: dict) -> bool:
        name = func._schema.name
        if name in HOST_READS:
            return True
        if func is torch.ops.aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return name in MASK_INDEXED and any(index is not None and index.dtype in (torch.bool, torch.uint8)
                                            for index in args[1])


def counted_syncs(loss_fn, model, batch: dict) -> int:
    """Waits for the device in one forward and backward of ``model`` on ``batch``."""
    with HostSyncs() as counter:
        loss_fn(model, batch).backward()
    model.zero_grad()
    return counter.count


def counted_operators(model, loss_fn, optimizer, batch: dict) -> tuple[int, int, int]:
    """ATen operators of one training step on ``batch``: all of them in the forward and backward, those of
    them that run work on the device (``DeviceWork``), and the foreach operators of the optimizer step
    run as AdamW runs it on CUDA (on CPU it steps parameter by parameter, reading each parameter's step
    count, which on CUDA is a host tensor)."""
    with OperatorCount() as every, DeviceWork() as launching:
        loss_fn(model, batch).backward()
    settings = [group["foreach"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["foreach"] = True
    try:
        with ForeachOperators() as stepping:
            optimizer.step()
            optimizer.zero_grad()
    finally:
        for group, foreach in zip(optimizer.param_groups, settings):
            group["foreach"] = foreach
    return every.count, launching.count, stepping.count


def counted_flops(model, loss_fn, batch: dict) -> int:
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss_fn(model, batch).backward()
    model.zero_grad()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, used in turn")
    parser.add_argument("--fusion", default="difference", choices=["difference", "concat", "fused"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of each model")
    parser.add_argument("--profile", action="store_true", help="print the operators that take the most time")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the demo config (train.yaml)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    cache = os.environ.get("LUMEN_CACHE", str(ROOT / ".cache" / "lumen"))
    # Llava's tower is a Hugging Face one: the tiny base with NVILA's kind of tower (SigLIP), on the Medical-Diff-VQA
    # questions (one source) whose batches docs/training.md timed.
    cfg = compose_config("train", [f"paths.cache_dir={cache}", "paths.output_dir=unused", "prepare.tiny_base.vision_tower=siglip",
                                   "data=diffvqa", "data.use_prior=false",
                                   f"data.batch_size={args.batch_size}", f"model.net.dtype={args.dtype}",
                                   # Hugging Face's Llava below tunes its tower: so does ours (the demo freezes it).
                                   "model.net.tune_vision=true",
                                   f"model.net.fusion.mode={args.fusion}", *args.overrides])
    prepare(cfg)
    config = ModelConfig(**cfg.model.net)
    datamodule = hydra.utils.instantiate(cfg.data, input_spec=input_spec(config))
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append({key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
        if len(batches) == args.batches:
            break
    images_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    for batch in batches:
        batch["current_images"] = batch["current_images"].to(images_dtype)  # Llava does not cast its pixels

    ours = build_model(config).train().to(device)
    ours.fusion.every_parameter_every_step = False  # as LumenLitModule sets it for one process
    llava = llava_like(ours).to(device)
    optimizer_config = cfg.model.optimizer
    ours_optimizer = torch.optim.AdamW(parameter_groups(ours, optimizer_config.lr, optimizer_config.weight_decay),
                                       betas=tuple(optimizer_config.betas))
    llava_optimizer = torch.optim.AdamW(llava.parameters(), optimizer_config.lr, betas=tuple(optimizer_config.betas),
                                        weight_decay=optimizer_config.weight_decay)

    with torch.no_grad():
        losses = ours_loss(ours, batches[0]).item(), llava_loss(llava, batches[0]).item()
    flops = counted_flops(ours, ours_loss, batches[0]), counted_flops(llava, llava_loss, batches[0])
    # The counter sees the padding computed, so the prediction counts every position as a token here.
    every_position = dict(batches[0], attention_mask=torch.ones_like(batches[0]["attention_mask"]))
    predicted = measure_step_flops(config).of_batch(every_position)

    arms = {"ours": (ours, ours_loss, ours_optimizer), "HF Llava": (llava, llava_loss, llava_optimizer)}
    for model, loss_fn, optimizer in arms.values():
        train_steps(model, loss_fn, optimizer, batches, args.warmup, device)
    operators = {name: counted_operators(*arm, batches[0]) for name, arm in arms.items()}
    syncs = {name: counted_syncs(loss_fn, model, batches[0]) for name, (model, loss_fn, _) in arms.items()}
    rounds = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (model, loss_fn, optimizer) in arms.items():
            rounds[name].append(train_steps(model, loss_fn, optimizer, batches, args.steps, device))
    tokens_per_step = sum(real_tokens(batches[step % len(batches)]) for step in range(args.steps)) / args.steps

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntraining step, {args.batch_size} one-image samples per batch ({tokens_per_step:.0f} real tokens), "
          f"{ours.tokens_per_image} visual tokens per image, {args.dtype}, {device_name}, fusion {args.fusion}; "
          f"median of {args.repeats} rounds of {args.steps} steps after {args.warmup} warm-up steps\n")
    print(f"loss on the first batch before training: ours {losses[0]:.6f}, HF Llava {losses[1]:.6f}")
    print(f"FLOPs of a step on it (FlopCounterMode): ours {flops[0]:.4g} (models/flops.py predicts {predicted:.4g}), "
          f"HF Llava {flops[1]:.4g}: ours does {flops[0] / flops[1]:.3f}x the work")
    print("ATen operators of a step's forward and backward on it, and of those the ones that run work on the device: "
          + ", ".join(f"{name} {every} ({launching})" for name, (every, launching, _) in operators.items())
          + "; foreach operators in its AdamW step, as on CUDA: "
          + ", ".join(f"{name} {stepping}" for name, (_, _, stepping) in operators.items()))
    print(f"waits for the device in its forward and backward (HostSyncs): ours {syncs['ours']}, "
          f"HF Llava {syncs['HF Llava']}\n")
    print("| model | steps/s | tokens/s | round seconds (min / median / max) |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for name, seconds in rounds.items():
        medians[name] = statistics.median(seconds)
        print(f"| {name} | {args.steps / medians[name]:.2f} | {args.steps * tokens_per_step / medians[name]:.0f} | "
              f"{min(seconds):.3f} / {medians[name]:.3f} / {max(seconds):.3f} |")
    print(f"\nthroughput ours / HF Llava: {medians['HF Llava'] / medians['ours']:.3f}")
    if args.profile:
        for name, (model, loss_fn, optimizer) in arms.items():
            print(f"\n{name}: operators by self time over {args.steps} steps")
            print(profiled(lambda: train_steps(model, loss_fn, optimizer, batches, args.steps, device), device))


def profiled(run, device: torch.device) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        run()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=20)


if __name__ == "__main__":
    main()
