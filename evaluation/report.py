"""Results files: per-sample scores averaged per task and question type, a Markdown table, and
atomic writers so an interrupted run never leaves a half-written result behind."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from evaluation.metrics import METRIC_SIGNATURES


def _summary(values: list[float]) -> dict:
    return {"mean": math.fsum(values) / len(values), "n": len(values)}


def aggregate(scored_records: list[dict]) -> dict:
    """Mean and count of every metric, overall and per task and question type.

    A scored record is a prediction record with its `score_sample` metrics merged in; fields named
    in `METRIC_SIGNATURES` are the metrics, every other field is ignored. Returns JSON-ready dicts:
    `{"n_samples", "overall": {metric: {"mean", "n"}},
      "by_task": {task: {question_type: {metric: {"mean", "n"}}}}, "signatures": {metric: how}}`.
    A metric averages only the samples it applies to, so its n can be below n_samples.
    """
    n_samples = 0
    overall: dict[str, list[float]] = defaultdict(list)
    by_group: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in scored_records:
        n_samples += 1
        for name in METRIC_SIGNATURES.keys() & record.keys():
            if record[name] is None:  # not scored (a judge parse failure): the metric does not apply
                continue
            overall[name].append(record[name])
            by_group[(record["task"], record["question_type"])][name].append(record[name])
    names = [name for name in METRIC_SIGNATURES if name in overall]
    by_task: dict[str, dict] = {}
    for (task, question_type), metrics in sorted(by_group.items()):
        by_task.setdefault(task, {})[question_type] = {
            name: _summary(metrics[name]) for name in names if name in metrics}
    return {
        "n_samples": n_samples,
        "overall": {name: _summary(overall[name]) for name in names},
        "by_task": by_task,
        "signatures": {name: METRIC_SIGNATURES[name] for name in names},
    }


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(summary: dict | None) -> str:
    return f"{summary['mean']:.3f} (n={summary['n']})" if summary else "–"


def markdown_table(results: dict) -> str:
    """One row per question type, grouped by task, then an overall row; one column per metric
    showing its mean and the number of samples it averages ("–" where it does not apply)."""
    names = list(results["overall"])
    lines = [_row(["Task", "Question type", *names]), _row(["---"] * (len(names) + 2))]
    for task, question_types in results["by_task"].items():
        for question_type, metrics in question_types.items():
            lines.append(_row([task, question_type, *(_cell(metrics.get(name)) for name in names)]))
    lines.append(_row(["**overall**", "", *(_cell(results["overall"][name]) for name in names)]))
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place: readers see the
    old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); results are shared like any other output.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """Atomically write `obj` as indented JSON; NaN and infinities are refused (not valid JSON)."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_jsonl_atomic(path: str | Path, records) -> None:
    """Atomically write one JSON object per line."""
    lines = (json.dumps(record, allow_nan=False) + "\n" for record in records)
    write_text_atomic(path, "".join(lines))
