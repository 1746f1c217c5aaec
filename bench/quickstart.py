"""The README's quickstart, timed: ``python train.py`` then ``python eval.py ckpt=<its checkpoint>``, exactly as a
new user types them, from a cold cache (a new, empty ``LUMEN_CACHE``), so the world and the tiny base are built
too. Prints the wall time of each stage, the size of the Python environment, and the demo's scores; the
README's quickstart figures are this script's.

    python -m bench.quickstart                 # about 7 minutes on a 2-core Intel Xeon (docs/results.md)
    python -m bench.quickstart --cache DIR     # keep the built world and base in DIR (must not exist yet)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The line each training stage ends with: (stage, the start of the line).
TRAIN_STAGES = (("synthetic world", "prepare world: "), ("tiny base model", "prepare tiny_base: "),
                ("training", "checkpoint: "))


def run(command: list[str], env: dict[str, str], marks: tuple[tuple[str, str], ...] = ()) -> tuple[list[str], dict]:
    """Runs ``command`` from the repository root, echoing its output; returns its lines and the wall time of
    each stage, a stage ending at the first line that contains its mark (the last one at the exit)."""
    start = last = time.perf_counter()
    seconds, lines, pending = {}, [], list(marks)
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        # Bytes, split at newlines only: a progress bar's carriage returns redraw one line, as in a terminal.
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line.rstrip("\n").rsplit("\r", 1)[-1])
            while pending and pending[0][1] in line:
                now = time.perf_counter()
                seconds[pending.pop(0)[0]] = now - last
                last = now
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {process.returncode}")
    seconds["total"] = time.perf_counter() - start
    return lines, seconds


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="LUMEN_CACHE for the run (default: a temporary directory)")
    args = parser.parse_args()
    if args.cache is not None and args.cache.exists():
        raise SystemExit(f"--cache {args.cache} exists: the quickstart is timed from a cold cache, give a new path")
    with tempfile.TemporaryDirectory(prefix="lumen-quickstart-") as temporary:
        cache = args.cache or Path(temporary) / "cache"
        env = dict(os.environ, LUMEN_CACHE=str(cache))
        lines, train_seconds = run([sys.executable, "train.py"], env, TRAIN_STAGES)
        checkpoint = next(line.split(": ", 1)[1] for line in lines if line.startswith("checkpoint: "))
        lines, eval_seconds = run([sys.executable, "eval.py", f"ckpt={checkpoint}"], env)
    results_dir = Path(next(line.split(": ", 1)[1] for line in lines if line.startswith("results: ")))
    results = json.loads((results_dir / "results.json").read_text())

    stages = {**{name: train_seconds[name] for name, _ in TRAIN_STAGES}, "evaluation": eval_seconds["total"]}
    # What train.py spends before its first mark (imports, composing the config) is counted in the first stage.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nquickstart from a cold cache ({cpus} CPUs, {platform.machine()}, Python {platform.python_version()}):\n")
    print("| stage | wall (s) |\n| --- | --- |")
    for name, value in stages.items():
        print(f"| {name} | {value:.0f} |")
    print(f"| **python train.py + python eval.py** | **{train_seconds['total'] + eval_seconds['total']:.0f}** |")
    print(f"\nPython environment ({sys.prefix}): {directory_size(Path(sys.prefix)) / 1e9:.1f} GB")
    overall = results["overall"]
    difference = results["by_task"].get("difference", {}).get("difference", {})
    scores = {"difference: added/missing sets right": difference.get("difference_correct"),
              "diagnostic closed: accuracy": overall.get("closed_accuracy"),
              "diagnostic closed: accuracy by LLaVA-Med's rule": overall.get("closed_accuracy_llava_med"),
              "diagnostic open: token recall": overall.get("token_recall")}
    for name, summary in scores.items():
        if summary is not None:
            print(f"{name}: {summary['mean']:.3f} (n={summary['n']})")


if __name__ == "__main__":
    main()
