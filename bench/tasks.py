"""Proof that the LUMEN mixture and MMXU fine-tuning learn their tasks: a benchmark, not a test.

Trains, for the same number of steps on the same synthetic world (seed 0):
  mmxu                 experiment=mmxu: MMXU single-choice questions, no history
  mmxu-global          the same with the prior report in the prompt (MAG's global record)
  mmxu-one-image       the same without the prior image (the current image and the question only)
  lumen                data=lumen: diagnostic + difference + prognostic, expert predictions in the prompt
  lumen-one-image      the same without the prior image (two-image questions see the current image only)
  lumen-no-experts     the same as lumen without the expert predictions
  temporal             data=lumen with the two-image sources only: difference + prognostic
  temporal-one-image   the same without the prior image
  temporal-experts     temporal with the expert predictions on the current image in the prompt
  temporal-experts-one-image   the same without the prior image
then scores a held-out world generated with another seed: MMXU arms on all its MMXU questions
(``MMXU-dev.jsonl``, every subject; chance is 0.25), LUMEN arms on its prognostic questions (every
finding's expected course right, ``prognosis_correct``, and LLaVA-Med token recall against the
world's ground truth) and its difference questions. Two baselines are printed beside the prognostic
scores: text only (for each asked number of days, the training world's most frequent answer) and
the best forecast from the current study alone (the world's own model without the prior study: the
ceiling of any one-image model). The prognostic scores are then split by whether that forecast is
wrong: the questions where the prior study changes the answer, which only a two-image model can get.

    python -m bench.tasks                        # the four default arms, about 10 minutes each (2 cores)
    python -m bench.tasks --variants mmxu-global lumen-no-experts   # the other two
    python -m bench.tasks --variants temporal temporal-one-image --steps 12000 --train-subjects 6000 \
        --eval-subjects 2000                    # the README's prognostic result, about 2 hours (2 cores)
    python -m bench.tasks --variants mmxu mmxu-one-image --steps 600
    python -m bench.tasks --reuse                # train and evaluate only what was not yet run with these settings
    python -m bench.tasks --reuse --eval-subjects 2000   # the same models on a larger held-out world
    python -m bench.tasks --train-overrides trainer=gpu --eval-overrides accelerator=gpu   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from scipy.stats import binomtest

from common.prognosis_grammar import Expectation, parse_prognosis, same_prognosis
from datamodules.synthetic.population import simulate_population
from datamodules.synthetic.prognostic_truth import prognosis

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LUMEN_CACHE", ROOT / ".cache" / "lumen"))  # configs/paths/default.yaml's cache_dir

EXPERTS = "data.experts=${paths.experts}"
PROGNOSTIC_ONLY = ["data.sources.diagnostic=null", "data.sources.difference=null"]
DIFFERENCE_ONLY = ["data.sources.diagnostic=null", "data.sources.prognostic=null"]
# name -> (train overrides, {evaluation name: eval overrides})
MMXU_EVAL = {"mmxu": ["data=mmxu", "data.sources.mmxu.test=${paths.mmxu}/MMXU-dev.jsonl"]}
VARIANTS = {
    "mmxu": (["experiment=mmxu"], MMXU_EVAL),
    "mmxu-global": (["experiment=mmxu", "data.sources.mmxu.history=global"],
                    {"mmxu": MMXU_EVAL["mmxu"] + ["data.sources.mmxu.history=global"]}),
    "mmxu-one-image": (["experiment=mmxu", "data.use_prior=false"], MMXU_EVAL),
    "lumen": (["data=lumen", EXPERTS], {"prognostic": ["data=lumen", EXPERTS, *PROGNOSTIC_ONLY],
                                         "difference": ["data=lumen", EXPERTS, *DIFFERENCE_ONLY]}),
    "lumen-one-image": (["data=lumen", EXPERTS, "data.use_prior=false"],
                        {"prognostic": ["data=lumen", EXPERTS, *PROGNOSTIC_ONLY],
                         "difference": ["data=lumen", EXPERTS, *DIFFERENCE_ONLY]}),
    "lumen-no-experts": (["data=lumen"], {"prognostic": ["data=lumen", *PROGNOSTIC_ONLY],
                                          "difference": ["data=lumen", *DIFFERENCE_ONLY]}),
    "temporal": (["data=lumen", "data.sources.diagnostic=null"],
                 {"prognostic": ["data=lumen", *PROGNOSTIC_ONLY], "difference": ["data=lumen", *DIFFERENCE_ONLY]}),
    "temporal-one-image": (["data=lumen", "data.sources.diagnostic=null", "data.use_prior=false"],
                           {"prognostic": ["data=lumen", *PROGNOSTIC_ONLY],
                            "difference": ["data=lumen", *DIFFERENCE_ONLY]}),
    "temporal-experts": (["data=lumen", EXPERTS, "data.sources.diagnostic=null"],
                         {"prognostic": ["data=lumen", EXPERTS, *PROGNOSTIC_ONLY],
                          "difference": ["data=lumen", EXPERTS, *DIFFERENCE_ONLY]}),
    "temporal-experts-one-image": (["data=lumen", EXPERTS, "data.sources.diagnostic=null", "data.use_prior=false"],
                                   {"prognostic": ["data=lumen", EXPERTS, *PROGNOSTIC_ONLY],
                                    "difference": ["data=lumen", EXPERTS, *DIFFERENCE_ONLY]}),
}
DEFAULT_VARIANTS = ["mmxu", "mmxu-one-image", "lumen", "lumen-one-image"]
PAIRS = [("mmxu", "mmxu-one-image"), ("mmxu-global", "mmxu"), ("lumen", "lumen-one-image"),
         ("lumen", "lumen-no-experts"), ("temporal", "temporal-one-image"),
         ("temporal-experts", "temporal-experts-one-image"), ("temporal-experts", "temporal")]


def run(command: list[str]) -> float:
    """Runs a command from the repository root; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]

SCORED = {"mmxu": "choice_accuracy", "difference": "difference_correct", "prognostic": "prognosis_correct"}


def score(name: str, records: list[dict]) -> dict[str, int | float]:
    """Per sample, 0/1: MMXU letters, difference sets, every finding's expected course."""
    return {r["sample_id"]: r[SCORED[name]] for r in records if SCORED[name] in r}


def mean_of(records: list[dict], metric: str) -> str:
    values = [record[metric] for record in records if metric in record]
    return f"{sum(values) / len(values):.3f}" if values else "–"


def days_prior(train_world: Path, held_out: list[dict]) -> float:
    """prognosis_correct of answering each held-out question with the training world's most frequent
    answer for the same asked days (a model that reads the question and ignores the images)."""
    by_days = defaultdict(Counter)
    for record in read_jsonl(train_world / "prognostic" / "prognostic.jsonl"):
        if record["split"] == "train":
            by_days[record["days"]][record["answer"]] += 1
    overall = Counter(answer for counts in by_days.values() for answer in counts.elements())
    guesses = [(by_days.get(r["days"]) or overall).most_common(1)[0][0] for r in held_out]
    return sum(same_prognosis(parse_prognosis(guess), parse_prognosis(record["answer"]))
               for guess, record in zip(guesses, held_out)) / len(held_out)


def by_finding(answer: str) -> dict[str, Expectation]:
    """Finding -> what a prognostic answer expects of it (empty when the answer does not parse)."""
    return {expectation.finding: expectation for expectation in parse_prognosis(answer).expectations}


def prior_dependent(subjects: int, seed: int, held_out: list[dict]) -> dict[str, set[str]]:
    """Sample id -> the findings whose expected course the prior study changes: where the world's own
    best forecast from the current study alone differs from the truth. Only a model that reads the
    prior study can get them right; a question with any of them is one the prior changes."""
    studies = {study.study_id: study for study in simulate_population(subjects, seed)}
    dependent = {}
    for record in held_out:
        truth = by_finding(record["answer"])
        alone = by_finding(prognosis(studies[record["study_id"]], record["days"]))
        dependent[record["id"]] = {finding for finding in truth.keys() | alone.keys()
                                   if truth.get(finding) != alone.get(finding)}
    return dependent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per model (same for all)")
    parser.add_argument("--train-subjects", type=int, default=1500, help="training world (seed 0)")
    parser.add_argument("--eval-subjects", type=int, default=600, help="held-out world (seed 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-tasks")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every arm, e.g. trainer=gpu")
    parser.add_argument("--eval-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra eval.py overrides for every evaluation, e.g. accelerator=gpu")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse an arm's earlier training and evaluations in --out whose commands are the same")
    args = parser.parse_args()

    world = [f"prepare.world.subjects={args.train_subjects}", "prepare.world.seed=0"]
    held_out = [f"prepare.world.subjects={args.eval_subjects}", "prepare.world.seed=1", "data.limit.test=null",
                "accelerator=cpu"]
    scores: dict[tuple[str, str], dict] = {}
    seconds: dict[str, float] = {}
    for name in args.variants:
        train_overrides, evaluations = VARIANTS[name]
        train_dir = args.out / name
        checkpoint = train_dir / "checkpoints" / "last.ckpt"
        eval_dirs = {task: args.out / f"{name}-{task}-heldout{args.eval_subjects}" for task in evaluations}
        # One command per stage, keyed by the directory it writes: "train", then each evaluation's.
        commands = {"train": ["train.py", *train_overrides, *world, f"trainer.max_steps={args.steps}",
                              "trainer.max_epochs=-1", "logger=csv", *args.train_overrides,
                              f"hydra.run.dir={train_dir}"]}
        for task, overrides in evaluations.items():
            commands[eval_dirs[task].name] = ["eval.py", f"ckpt={checkpoint}", *overrides, *held_out,
                                              *args.eval_overrides, f"hydra.run.dir={eval_dirs[task]}"]
        # Training and each evaluation are reused separately: a new held-out world reuses the models.
        arm_record = args.out / f"{name}.json"
        previous = json.loads(arm_record.read_text()) if args.reuse and arm_record.is_file() else {"commands": {}}
        done = {"train": checkpoint.is_file()} | {path.name: (path / "predictions.jsonl").is_file()
                                                    for path in eval_dirs.values()}
        reused = [stage for stage in commands if done[stage] and previous["commands"].get(stage) == commands[stage]]
        if reused:
            print(f"{name}: reusing {', '.join(reused)} in {args.out} (same commands)")
        if "train" in reused:
            seconds[name] = previous["seconds"]
            commands = previous["commands"] | commands  # the evaluations of the same model on other worlds
        else:
            seconds[name] = run(commands["train"])
        for path in eval_dirs.values():
            if path.name not in reused:
                if "train" not in reused:  # answers of an earlier model, which eval.py would refuse to mix in
                    shutil.rmtree(path, ignore_errors=True)
                run(commands[path.name])  # otherwise eval.py resumes an interrupted evaluation
        arm_record.parent.mkdir(parents=True, exist_ok=True)
        arm_record.write_text(json.dumps({"commands": commands, "seconds": seconds[name]}, indent=2))
        for task in evaluations:
            records = read_jsonl(eval_dirs[task] / "predictions.jsonl")
            scores[name, task] = {"correct": score(task, records), "records": records}

    print(f"\nA held-out world (seed 1, {args.eval_subjects} subjects) after {args.steps} training steps per model "
          f"on the seed-0 world ({args.train_subjects} subjects).\n")
    print("| model | train time (min) | questions | n | accuracy | token recall | courses F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, task), row in scores.items():
        correct = list(row["correct"].values())
        label = {"mmxu": "MMXU (letter)", "difference": "difference (added/missing sets)",
                 "prognostic": "prognostic (every course right)"}[task]
        print(f"| {name} | {seconds[name] / 60:.1f} | {label} | {len(correct)} | {sum(correct) / len(correct):.3f} "
              f"| {mean_of(row['records'], 'token_recall')} | {mean_of(row['records'], 'prognosis_f1')} |")
    prognostic = {name: row for (name, task), row in scores.items() if task == "prognostic"}
    if prognostic:
        held_out_world = CACHE / f"world-{args.eval_subjects}subjects-seed1"
        truth = {r["id"]: r for r in read_jsonl(held_out_world / "prognostic" / "prognostic.jsonl")}
        asked = [truth[r["sample_id"]] for r in next(iter(prognostic.values()))["records"]]
        train_world = CACHE / f"world-{args.train_subjects}subjects-seed0"
        dependent = prior_dependent(args.eval_subjects, 1, asked)
        print(f"\nprognostic, text only (the most frequent training answer for the asked days): "
              f"{days_prior(train_world, asked):.3f}")
        print(f"prognostic, the best forecast from the current study alone (the ceiling of one image): "
              f"{sum(not findings for findings in dependent.values()) / len(dependent):.3f}")
        print("\nprognostic, every course right, by whether the prior study changes the answer; and per finding, "
              "the course right where the prior changes it:\n")
        print("| model | prior changes the answer | the current study alone suffices | findings the prior changes |")
        print("| --- | --- | --- | --- |")
        groups = [[i for i, findings in dependent.items() if bool(findings) == wanted] for wanted in (True, False)]
        answers = {r["id"]: by_finding(r["answer"]) for r in asked}
        for name, row in prognostic.items():
            cells = [f"{sum(row['correct'][i] for i in ids)} of {len(ids)}" for ids in groups]
            predicted = {r["sample_id"]: by_finding(r["prediction"]) for r in row["records"]}
            right = sum(predicted[i].get(finding) == answers[i].get(finding)
                        for i, findings in dependent.items() for finding in findings)
            cells.append(f"{right} of {sum(map(len, dependent.values()))}")
            print(f"| {name} | {' | '.join(cells)} |")
    for first, second in PAIRS:
        for task in {task for (name, task) in scores if name == first}:
            if (second, task) not in scores:
                continue
            a, b = scores[first, task]["correct"], scores[second, task]["correct"]
            ids = a.keys() & b.keys()
            only_a = sum(1 for i in ids if a[i] and not b[i])
            only_b = sum(1 for i in ids if b[i] and not a[i])
            p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
            print(f"{first} vs {second} ({task}): McNemar (exact) {only_a} vs {only_b} discordant, p = {p:.2g}")


if __name__ == "__main__":
    main()
