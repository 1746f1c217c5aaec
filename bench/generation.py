"""Generation throughput: batched greedy decoding (left padding, KV cache) vs one sample at a time.

Both runs decode the same prompts of a split with the same model; only ``model.generate`` is timed
(prompts are collated beforehand). The script prints samples/s and new tokens/s of each, the speed-up
of batching, and how many answers differ between the two (they should not).

    python -m bench.generation                           # the demo's tiny base model, untrained
    python -m bench.generation --ckpt outputs/.../last.ckpt --batch-size 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hydra
import torch

from models.checkpoints import load_checkpoint
from models.config import ModelConfig
from models.factory import build_model, input_spec
from run.cli import compose_config, prepare

ROOT = Path(__file__).resolve().parents[1]

IMAGE_KEYS = ("current_images", "prior_images", "has_prior", "interval_days")


def decode_all(model, batches: list[dict], max_new_tokens: int, eos: int, pad: int) -> tuple[float, list[list[int]]]:
    """Greedy answers for every batch; returns (seconds spent in generate, answers without padding)."""
    answers = []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, **{k: batch[k] for k in IMAGE_KEYS})
            for row in new.tolist():
                answers.append(row[: row.index(eos) + 1] if eos in row else [t for t in row if t != pad])
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a training checkpoint or exported directory (default: the demo base)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = compose_config("train", [f"paths.cache_dir={ROOT / '.cache' / 'lumen'}", "paths.output_dir=unused", "data=diffvqa",
                                   f"data.limit.{args.split}={args.samples}", f"data.eval_batch_size={args.batch_size}"])
    prepare(cfg)
    if args.ckpt:
        loaded = load_checkpoint(args.ckpt)
        model, config = loaded.model, loaded.config
        prompt = {key: loaded.prompt[key] for key in ("use_prior", "interval_in_prompt") if key in loaded.prompt}
    else:
        config = ModelConfig(**cfg.model.net)
        model, prompt = build_model(config).eval(), {}
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer_dir=str(config.llm_dir), input_spec=input_spec(config),
                                         **prompt)
    batched = list(datamodule.generation_loader(args.split))
    dataset, collate = datamodule.dataset(args.split), datamodule.generation_collator
    single = [collate([dataset[i]]) for i in range(len(dataset))]
    eos = datamodule.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = datamodule.tokenizer.pad_token_id

    decode_all(model, single[:2], args.max_new_tokens, eos, pad)  # warm-up
    seconds_batched, answers_batched = decode_all(model, batched, args.max_new_tokens, eos, pad)
    seconds_single, answers_single = decode_all(model, single, args.max_new_tokens, eos, pad)
    tokens = sum(map(len, answers_batched))
    differ = sum(a != b for a, b in zip(answers_batched, answers_single))

    print(f"\n{len(dataset)} {args.split} prompts, greedy, up to {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} CPU threads, model {args.ckpt or config.base}\n")
    print("| decoding | seconds | samples/s | new tokens/s |")
    print("| --- | --- | --- | --- |")
    for name, seconds in ((f"batched ({args.batch_size})", seconds_batched), ("one at a time", seconds_single)):
        print(f"| {name} | {seconds:.2f} | {len(dataset) / seconds:.1f} | {tokens / seconds:.0f} |")
    print(f"\nbatched / one-at-a-time throughput: {seconds_single / seconds_batched:.2f}x")
    print(f"answers that differ between the two: {differ} of {len(dataset)}")


if __name__ == "__main__":
    main()
