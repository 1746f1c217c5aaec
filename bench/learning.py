"""Proof that the demo model learns change from two images: a benchmark, not a test.

Trains, for the same number of steps on the same synthetic world (seed 0):
  difference           the demo model: difference + current tokens (2N visual tokens)     experiment=demo
  difference-no-embed  the same without the interval embedding (the interval stays in the text)
  concat               prior + current tokens, NVILA's multi-image prompt (2N)
  fused                current tokens carrying the gated difference (N)
  one-image            the demo model and data, difference questions without their prior image
  nvila_ft             the paper's baseline: single-image diagnostic questions only      experiment=nvila_ft
The demo arms train on the single Medical-Diff-VQA source (``data=diffvqa``; the demo itself trains on a
weighted mixture, ``data=demo``), on the questions named by --tasks (default: difference questions only, so
the whole CPU budget goes to the skill under test; ``--tasks diagnostic difference`` for both, unweighted). Each model is then evaluated on the difference questions of a held-out world generated with
another seed; the script prints the accuracy of the added/missing finding sets (95% Wilson
intervals), micro-F1 of the added and of the missing findings, the visual tokens a two-image sample
costs, the accuracy ratio of --reference to every other arm, and an exact McNemar test of the
reference against each on the same questions.

    python -m bench.learning                               # about 6 CPU-minutes of training per model (2 cores)
    python -m bench.learning --variants fused one-image    # a subset
    python -m bench.learning --steps 600                   # quicker, weaker
    python -m bench.learning --reuse                       # train only the arms not yet run with these settings
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from evaluation.metrics import change_f1
from evaluation.stats import mcnemar

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "difference": ["experiment=demo", "model.net.fusion.mode=difference"],
    "difference-no-embed": ["experiment=demo", "model.net.fusion.mode=difference",
                            "model.net.fusion.interval_embedding=false"],
    "concat": ["experiment=demo", "model.net.fusion.mode=concat"],
    "fused": ["experiment=demo", "model.net.fusion.mode=fused"],
    "one-image": ["experiment=demo", "data.use_prior=false"],
    "nvila_ft": ["experiment=nvila_ft"],
}
REFERENCE = "difference"  # the demo's default mode


def run(command: list[str]) -> float:
    """Runs a command from the repository root; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500, help="optimizer steps per model (same for all)")
    parser.add_argument("--tasks", nargs="+", default=["difference"], choices=["diagnostic", "difference"],
                        help="what the two demo arms train on")
    parser.add_argument("--train-subjects", type=int, default=1500,
                        help="training world (seed 0); ~2.4 difference questions per subject")
    parser.add_argument("--eval-subjects", type=int, default=600, help="held-out world (seed 1); its test split is scored")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-learning")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reference", default=REFERENCE, choices=list(VARIANTS), help="the arm compared with every other")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse an arm's earlier run in --out when its train and eval commands are the same")
    args = parser.parse_args()

    world = [f"prepare.world.subjects={args.train_subjects}", "prepare.world.seed=0"]
    held_out = [f"prepare.world.subjects={args.eval_subjects}", "prepare.world.seed=1",
                "data.sources.diffvqa.tasks=[difference]", "data.limit.test=null", "accelerator=cpu"]
    rows = {}
    for name in args.variants:
        train_dir, eval_dir = args.out / name, args.out / f"{name}-eval"
        tasks = [] if name == "nvila_ft" else [f"data.sources.diffvqa.tasks=[{','.join(args.tasks)}]"]
        commands = {
            "train": ["train.py", "data=diffvqa", *VARIANTS[name], *tasks, *world, f"trainer.max_steps={args.steps}",
                      "trainer.max_epochs=-1", "logger=csv", f"hydra.run.dir={train_dir}"],
            "eval": ["eval.py", f"ckpt={train_dir / 'checkpoints' / 'last.ckpt'}", *held_out, f"hydra.run.dir={eval_dir}"],
        }
        arm_record = args.out / f"{name}.json"
        previous = json.loads(arm_record.read_text()) if arm_record.is_file() else {}
        if args.reuse and previous.get("commands") == commands and (eval_dir / "predictions.jsonl").is_file():
            seconds = previous["seconds"]
            print(f"{name}: reusing the run in {train_dir} (same commands)")
        else:
            seconds = run(commands["train"])
            run(commands["eval"])
            arm_record.write_text(json.dumps({"commands": commands, "seconds": seconds}, indent=2))
        records = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
        model = json.loads((eval_dir / "results.json").read_text())["model"]
        rows[name] = {
            "seconds": seconds,
            "tokens": model["visual_tokens_with_prior"] or model["tokens_per_image"],
            # Samples whose reference is outside the grammar have no difference_correct (not in the world's).
            "correct": {r["sample_id"]: r["difference_correct"] for r in records if "difference_correct" in r},
            "f1": change_f1([(r["prediction"], r["reference"]) for r in records]),
        }

    print(f"\nDifference questions of a held-out world (seed 1, {args.eval_subjects} subjects, test split); "
          f"{args.steps} training steps per model on the seed-0 world ({args.train_subjects} subjects); "
          f"demo arms trained on: {', '.join(args.tasks)}.\n")
    print("| model | visual tokens per two-image sample | train time (min) | n | accuracy (added/missing sets) "
          "| 95% CI | F1 added | F1 missing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        correct = list(row["correct"].values())
        low, high = wilson(sum(correct), len(correct))
        row["accuracy"] = sum(correct) / len(correct)
        print(f"| {name} | {row['tokens']} | {row['seconds'] / 60:.1f} | {len(correct)} | {row['accuracy']:.3f} "
              f"| {low:.3f}–{high:.3f} | {row['f1']['added']['f1']:.3f} | {row['f1']['missing']['f1']:.3f} |")
    if args.reference in rows:
        reference = rows[args.reference]
        for name in [n for n in rows if n != args.reference]:
            ratio = f"{reference['accuracy'] / rows[name]['accuracy']:.2f}" if rows[name]["accuracy"] else "n/a"
            ids = sorted(reference["correct"].keys() & rows[name]["correct"].keys())
            test = mcnemar([reference["correct"][i] for i in ids], [rows[name]["correct"][i] for i in ids])
            print(f"{args.reference} / {name}: accuracy ratio {ratio}; McNemar (exact) {test.only_a} vs "
                  f"{test.only_b} discordant, p = {test.p_value:.2g}")


if __name__ == "__main__":
    main()
