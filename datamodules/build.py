"""Data-building commands.

    python -m datamodules.build enhance --diffvqa DIR --out enhanced.jsonl [--backend template|llm]
        [--base-url http://localhost:8000/v1 --model NAME --api-key-env OPENAI_API_KEY]

``enhance`` rewrites every short Medical-Diff-VQA answer as a full sentence (``datamodules.enhance``);
with ``--backend llm`` the answers are cached next to the output (``<out>.cache.jsonl``), so an
interrupted build resumes where it stopped.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from datamodules.enhance import PROMPT_VERSION, enhance
from datamodules.llm import ChatCache, LLMClient, LLMConfig
from evaluation.report import write_jsonl_atomic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("enhance", help="short answers -> full sentences")
    command.add_argument("--diffvqa", type=Path, required=True, help="the Medical-Diff-VQA directory")
    command.add_argument("--out", type=Path, required=True, help="the JSONL to write")
    command.add_argument("--backend", choices=["template", "llm"], default="template")
    command.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    command.add_argument("--base-url", help="OpenAI-compatible endpoint (llm backend)")
    command.add_argument("--model", help="model name at the endpoint (llm backend)")
    command.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    command.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)

    client = None
    if args.backend == "llm":
        if not (args.base_url and args.model):
            parser.error("--backend llm needs --base-url and --model")
        config = LLMConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                           concurrency=args.concurrency)
        client = LLMClient(config, ChatCache(args.out.with_suffix(".cache.jsonl")), PROMPT_VERSION)
    records = enhance(args.diffvqa / "mimic_pair_questions.csv", args.backend, client, tuple(args.splits))
    write_jsonl_atomic(args.out, records)
    counts = Counter(record["question_type"] for record in records)
    print(f"{len(records)} answers enhanced ({args.backend}) -> {args.out}: "
          + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
