"""Data-building commands.

    python -m datamodules.build enhance --diffvqa DIR --out enhanced.jsonl [--backend template|llm]
        [--base-url http://localhost:8000/v1 --model NAME --api-key-env OPENAI_API_KEY]

    python -m datamodules.build prognostic --diffvqa DIR --out prognostic.jsonl [--backend rules|llm]
        [--seed 0] [--base-url ... --model ... --api-key-env ...]

    python -m datamodules.build experts --mimic-cxr-jpg ROOT --weights-dir DIR --out experts.csv
        [--batch-size 16] [--device cpu|cuda] [--workers 4] [--limit N]

``enhance`` rewrites every short Medical-Diff-VQA answer as a full sentence (``datamodules.enhance``);
``prognostic`` asks, for every difference pair, what to expect after a drawn number of days
(``datamodules.prognostic``). With ``--backend llm`` the answers are cached next to the output
(``<out>.cache.jsonl``), so an interrupted build resumes where it stopped.

``experts`` runs TorchXRayVision's pathology, age, race and view models over every image of
MIMIC-CXR-JPG (``datamodules.experts_builder``); ``--weights-dir`` holds their weight files under
xrv's names (a copy of ``~/.torchxrayvision/models_data/``). Rows are kept in ``<out>.partial``
until all are done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from common.files import write_jsonl_atomic
from common.llm import ChatCache, LLMClient, LLMConfig
from datamodules.diffvqa import SPLITS
from datamodules.enhance import PROMPT_VERSION as ENHANCE_PROMPT
from datamodules.enhance import enhance
from datamodules.mimic import load_images
from datamodules.prognostic_builder import BACKENDS as PROGNOSTIC_BACKENDS
from datamodules.prognostic_builder import PROMPT_VERSION as PROGNOSTIC_PROMPT
from datamodules.prognostic_builder import build_prognostic


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
    command = commands.add_parser("experts", help="expert-model predictions for every image")
    command.add_argument("--mimic-cxr-jpg", type=Path, required=True, help="the MIMIC-CXR-JPG root")
    command.add_argument("--weights-dir", type=Path, required=True, help="xrv's weight files, under xrv's names")
    command.add_argument("--out", type=Path, required=True, help="the CSV to write")
    command.add_argument("--batch-size", type=int, default=16)
    command.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    command.add_argument("--workers", type=int, default=4, help="processes reading and resizing images")
    command.add_argument("--limit", type=int, help="only the first N images (a trial run)")
    args = parser.parse_args(argv)
    if args.command == "experts":
        build_experts(args)
    else:
        build_with_llm_or_offline(args, parser)


def _client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LLMClient | None:
    if args.backend != "llm":
        return None
    if not (args.base_url and args.model):
        parser.error("--backend llm needs --base-url and --model")
    config = LLMConfig(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                       concurrency=args.concurrency)
    version = ENHANCE_PROMPT if args.command == "enhance" else PROGNOSTIC_PROMPT
    return LLMClient(config, ChatCache(args.out.with_suffix(".cache.jsonl")), version)


def build_with_llm_or_offline(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    client = _client(args, parser)
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


def build_experts(args: argparse.Namespace) -> None:
    # Imported here: torch and torchxrayvision are needed by this command only.
    from datamodules.experts_builder import load_expert_models, partial_path, run_experts

    started = time.perf_counter()
    images = load_images(args.mimic_cxr_jpg)
    if args.limit is not None:
        images = images.head(args.limit)
    models = load_expert_models(args.weights_dir)
    run = run_experts(images, models, args.out, batch_size=args.batch_size, device=args.device, workers=args.workers)
    print(f"{run.images} images -> {args.out}: {run.computed} computed, {run.resumed} resumed from "
          f"{partial_path(args.out)}, in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
