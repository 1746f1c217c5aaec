"""Data-building commands.

    python -m datamodules.build enhance --diffvqa DIR --out enhanced.jsonl [--backend template|llm]
        [--base-url http://localhost:8000/v1 --model NAME --api-key-env OPENAI_API_KEY]

    python -m datamodules.build prognostic --diffvqa DIR --out prognostic.jsonl [--backend rules|llm]
        [--seed 0] [--base-url ... --model ... --api-key-env ...]

``enhance`` rewrites every short Medical-Diff-VQA answer as a full sentence (``datamodules.enhance``);
``prognostic`` asks, for every difference pair, what to expect after a drawn number of days
(``datamodules.prognostic``). With ``--backend llm`` the answers are cached next to the output
(``<out>.cache.jsonl``), so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from datamodules.diffvqa import SPLITS
from datamodules.enhance import PROMPT_VERSION as ENHANCE_PROMPT
from datamodules.enhance import enhance
from datamodules.prognostic import BACKENDS as PROGNOSTIC_BACKENDS
from datamodules.prognostic import PROMPT_VERSION as PROGNOSTIC_PROMPT
from datamodules.llm import ChatCache, LLMClient, LLMConfig
from datamodules.prognostic import build_prognostic
from evaluation.report import write_jsonl_atomic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    enhance_command = commands.add_parser("enhance", help="short answers -> full sentences")
    enhance_command.add_argument("--backend", choices=["template", "llm"], default="template")
    prognostic_command = commands.add_parser("prognostic", help="difference pairs -> prognostic questions")
    prognostic_command.add_argument("--backend", choices=list(PROGNOSTIC_BACKENDS), default="rules")
    prognostic_command.add_argument("--seed", type=int, default=0, help="draws templates and days")
    for command in (enhance_command, prognostic_command):
        command.add_argument("--diffvqa", type=Path, required=True, help="the Medical-Diff-VQA directory")
        command.add_argument("--out", type=Path, required=True, help="the JSONL to write")
        command.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
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
        version = ENHANCE_PROMPT if args.command == "enhance" else PROGNOSTIC_PROMPT
        client = LLMClient(config, ChatCache(args.out.with_suffix(".cache.jsonl")), version)
    if args.command == "enhance":
        records = enhance(args.diffvqa / "mimic_pair_questions.csv", args.backend, client, tuple(args.splits))
        write_jsonl_atomic(args.out, records)
        counts = Counter(record["question_type"] for record in records)
        print(f"{len(records)} answers enhanced ({args.backend}) -> {args.out}: "
              + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
    else:
        records, reports = build_prognostic(args.diffvqa, args.backend, client, tuple(args.splits), args.seed)
        write_jsonl_atomic(args.out, records)
        print(f"{len(records)} prognostic questions ({args.backend}) -> {args.out}; difference rows: "
              + "; ".join(f"{split}: {report}" for split, report in reports.items()))


if __name__ == "__main__":
    main()
