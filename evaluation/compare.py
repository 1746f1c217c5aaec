"""Compare two evaluation runs sample by sample: mean differences with paired statistics.

    python -m evaluation.compare RUN_A RUN_B [--out DIR] [--metrics NAME ...] [--by task|question_type]

RUN_A and RUN_B are run directories written by eval.py, each holding predictions.jsonl (one scored
record per sample). Samples are matched by sample_id; how many matched and how many are in only
one run is reported (their ids are listed in comparison.json), never dropped silently.

For every metric scored in both runs (or those named by --metrics), overall and per task (or
question type, --by), a row gives: n, the samples that both runs scored with the metric; the mean
of A and of B over those samples; the mean difference B - A (positive: B scores higher); its 95%
paired bootstrap interval (BCa, percentile where BCa is degenerate; 9999 resamples, seed 0); the
two-sided Wilcoxon signed-rank p ("identical" when every difference is zero); and, for 0/1
metrics, McNemar's exact test: samples only A got right / only B got right, and p.

Writes comparison.md (a Markdown table) and comparison.json into RUN_B, or into --out, and prints
the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from common.files import write_json_atomic, write_text_atomic
from evaluation.metrics import METRIC_SIGNATURES, ZERO_ONE_METRICS
from evaluation.stats import mcnemar, paired_bootstrap_ci, wilcoxon

CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0


def read_predictions(run_dir: str | Path, by: str) -> dict[str, dict]:
    """The records of `run_dir/predictions.jsonl` by sample_id, each needing a `by` field."""
    path = Path(run_dir) / "predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass run directories written by eval.py")
    records: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from error
        for field in ("sample_id", by):
            if field not in record:
                raise ValueError(f"{path}, line {number}: no '{field}' field; every record "
                                 f"needs one (as eval.py writes them)")
        sample_id = str(record["sample_id"])
        if sample_id in records:
            raise ValueError(f"{path}, line {number}: sample_id {sample_id!r} repeats line "
                             f"{lines[sample_id]}; each sample must be scored once")
        # No score (a judge that could not grade the answer) means the metric does not apply.
        record = {key: value for key, value in record.items() if value is not None}
        for name in METRIC_SIGNATURES.keys() & record.keys():
            if isinstance(record[name], bool) or not isinstance(record[name], (int, float)):
                raise ValueError(f"{path}, line {number}: metric '{name}' is "
                                 f"{record[name]!r}, not a number; rescore the run")
        records[sample_id], lines[sample_id] = record, number
    return records


def compare_metric(values_a: list[float], values_b: list[float], zero_one: bool) -> dict:
    """One row: n, both means, B - A, its bootstrap interval (None below two samples), Wilcoxon,
    and McNemar for 0/1 metrics (else None)."""
    n = len(values_a)
    mean_a, mean_b = math.fsum(values_a) / n, math.fsum(values_b) / n
    return {
        "n": n,
        "mean_a": mean_a,
        "mean_b": mean_b,
        "difference": mean_b - mean_a,
        "bootstrap": asdict(paired_bootstrap_ci(values_a, values_b, CONFIDENCE, N_RESAMPLES, SEED))
        if n >= 2 else None,
        "wilcoxon": asdict(wilcoxon(values_a, values_b)),
        "mcnemar": asdict(mcnemar(values_a, values_b)) if zero_one else None,
    }


def _metrics_in_both(records_a: dict, records_b: dict, requested: list[str] | None,
                     run_a: Path, run_b: Path) -> list[str]:
    scored = [set().union(*(METRIC_SIGNATURES.keys() & r.keys() for r in records.values()))
              for records in (records_a, records_b)]
    if requested is None:
        return [name for name in METRIC_SIGNATURES if name in scored[0] and name in scored[1]]
    for name in requested:
        if name not in METRIC_SIGNATURES:
            raise ValueError(f"unknown metric {name!r}; choose from {list(METRIC_SIGNATURES)}")
        for run, names in ((run_a, scored[0]), (run_b, scored[1])):
            if name not in names:
                raise ValueError(f"{run / 'predictions.jsonl'} has no '{name}' scores; "
                                 f"rescore the run or leave the metric out")
    return requested


def compare_runs(run_a: str | Path, run_b: str | Path, metrics: list[str] | None = None,
                 by: str = "task") -> dict:
    """The JSON-ready comparison of two run directories (see the module docstring):
    `{"run_a", "run_b", "difference": "B - A", "by", "samples": {"matched", "only_in_a",
      "only_in_b"}, "overall": {metric: row}, "groups": {group: {metric: row}}}`
    with rows as `compare_metric` makes them, the overall ones also counting the matched samples
    scored with the metric in only one run ("unpaired", left out of n). A metric that applies to
    no matched sample of a group has no row there."""
    run_a, run_b = Path(run_a), Path(run_b)
    records_a, records_b = read_predictions(run_a, by), read_predictions(run_b, by)
    matched = [sample_id for sample_id in records_a if sample_id in records_b]
    if not matched:
        raise ValueError(f"{run_a / 'predictions.jsonl'} and {run_b / 'predictions.jsonl'} share no "
                         "sample_id: compare runs on the same split of the same data")
    for sample_id in matched:
        if records_a[sample_id][by] != records_b[sample_id][by]:
            raise ValueError(f"sample {sample_id!r} has {by} {records_a[sample_id][by]!r} in "
                             f"{run_a / 'predictions.jsonl'} but {records_b[sample_id][by]!r} in "
                             f"{run_b / 'predictions.jsonl'}: the runs scored different data")
    names = _metrics_in_both(records_a, records_b, metrics, run_a, run_b)
    groups = sorted({str(records_a[sample_id][by]) for sample_id in matched})
    comparison = {
        "run_a": str(run_a), "run_b": str(run_b), "difference": "B - A", "by": by,
        "samples": {
            "matched": len(matched),
            "only_in_a": sorted(records_a.keys() - records_b.keys()),
            "only_in_b": sorted(records_b.keys() - records_a.keys()),
        },
        "overall": {}, "groups": {group: {} for group in groups},
    }
    for name in names:
        # A metric applies to a sample by its reference, so matched samples normally carry it in
        # both runs or in neither; a sample scored in only one run cannot be paired.
        pairs = [(records_a[i][name], records_b[i][name], str(records_a[i][by])) for i in matched
                 if name in records_a[i] and name in records_b[i]]
        if not pairs:
            continue
        comparison["overall"][name] = compare_metric(
            [a for a, _, _ in pairs], [b for _, b, _ in pairs], name in ZERO_ONE_METRICS)
        comparison["overall"][name]["unpaired"] = sum(
            (name in records_a[i]) != (name in records_b[i]) for i in matched)
        for group in groups:
            in_group = [(a, b) for a, b, g in pairs if g == group]
            if in_group:
                comparison["groups"][group][name] = compare_metric(
                    [a for a, _ in in_group], [b for _, b in in_group], name in ZERO_ONE_METRICS)
    return comparison


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cells(name: str, group: str, row: dict) -> list[str]:
    interval = row["bootstrap"]
    ci = "–" if interval is None else (
        f"[{interval['low']:+.3f}, {interval['high']:+.3f}]"
        + (" (percentile)" if interval["method"] == "percentile" else ""))
    signed_rank = row["wilcoxon"]
    signed_rank_p = "identical" if signed_rank["identical"] else f"{signed_rank['p_value']:.3g}"
    test = row["mcnemar"]
    discordant = ("–" if test is None
                  else f"{test['only_a']} / {test['only_b']}, p={test['p_value']:.3g}")
    return [name, group, str(row["n"]), f"{row['mean_a']:.3f}", f"{row['mean_b']:.3f}",
            f"{row['difference']:+.3f}", ci, signed_rank_p, discordant]


def markdown(comparison: dict) -> str:
    """The comparison as a Markdown note and table: per metric an overall row, then its groups."""
    samples = comparison["samples"]
    group_title = comparison["by"].replace("_", " ").capitalize()
    lines = [
        f"A: `{comparison['run_a']}`  ",
        f"B: `{comparison['run_b']}`  ",
        f"Samples matched by sample_id: {samples['matched']}; only in A: "
        f"{len(samples['only_in_a'])}; only in B: {len(samples['only_in_b'])} "
        "(ids in comparison.json).  ",
        f"B − A > 0: B scores higher. CI: {CONFIDENCE:.0%} paired bootstrap (BCa; percentile where "
        f"BCa is degenerate), {N_RESAMPLES} resamples, seed {SEED}. Wilcoxon signed-rank, "
        "two-sided. McNemar (0/1 metrics), exact: samples only A / only B got right.",
        "",
        _row(["Metric", group_title, "n", "A", "B", "B − A", f"{CONFIDENCE:.0%} CI",
              "Wilcoxon p", "McNemar"]),
        _row(["---"] * 9),
    ]
    for name, row in comparison["overall"].items():
        lines.append(_row(_cells(name, "**overall**", row)))
        for group, rows in comparison["groups"].items():
            if name in rows:
                lines.append(_row(_cells(name, group, rows[name])))
    lines += [f"\n{name}: {row['unpaired']} matched samples scored in only one run, left out."
              for name, row in comparison["overall"].items() if row["unpaired"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, metavar="RUN_A", help="the baseline run directory")
    parser.add_argument("run_b", type=Path, metavar="RUN_B", help="the run compared with it")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where to write the results (default: RUN_B)")
    parser.add_argument("--metrics", nargs="+", metavar="NAME",
                        help="metrics to compare (default: all that both runs scored)")
    parser.add_argument("--by", choices=["task", "question_type"], default="task",
                        help="the field grouping the per-group rows (default: task)")
    args = parser.parse_args(argv)
    try:
        comparison = compare_runs(args.run_a, args.run_b, args.metrics, args.by)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    out = args.out or args.run_b
    table = markdown(comparison)
    write_json_atomic(out / "comparison.json", comparison)
    write_text_atomic(out / "comparison.md", table)
    print(table)
    print(f"comparison: {out}")
    return comparison


if __name__ == "__main__":
    main()
