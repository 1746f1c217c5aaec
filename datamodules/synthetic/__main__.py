"""The command line: ``python -m datamodules.synthetic --out DIR --subjects 125 --seed 0``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from datamodules import synthetic
from datamodules.synthetic.writer import ensure_world


def main(argv: list[str] | None = None) -> None:
    # The package docstring describes the world; `prog` names the command, not this file.
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic", description=synthetic.__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="world directory (created, or reused when complete)")
    parser.add_argument("--subjects", type=int, default=125, help="number of simulated patients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes drawing the images (default: one per usable CPU, at most 16)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = ensure_world(args.out, args.subjects, args.seed, args.workers)
    counts = json.loads((out / "world.json").read_text())["counts"]
    print(
        f"synthetic world in {out}: {counts['subjects']} subjects, {counts['studies']} studies, "
        f"{counts['images']} images, {counts['questions']} Medical-Diff-VQA questions "
        f"({counts['difference_questions']} difference), {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
