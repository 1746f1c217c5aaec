"""Plots of an evaluation (PNG): each task's scores per question type, and the distribution of every
graded (not 0/1) per-sample score. Drawn with matplotlib's object API (no pyplot state, no display)
and written atomically."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.files import atomic_file
from evaluation.metrics import ZERO_ONE_METRICS, METRIC_SIGNATURES


def _save(figure: Figure, path: Path) -> Path:
    with atomic_file(path) as staging:
        figure.savefig(staging, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_by_question_type(results: dict, out: Path) -> list[Path]:
    """One PNG per task: a group of bars per question type, one bar per metric (its mean), with n."""
    paths = []
    for task, question_types in results["by_task"].items():
        names = [name for name in results["overall"] if any(name in m for m in question_types.values())]
        figure = Figure(figsize=(max(4.0, 1.2 * len(question_types) * max(1, len(names)) ** 0.5 + 2), 3.6))
        axes = figure.subplots()
        width = 0.8 / len(names)
        for offset, name in enumerate(names):
            means = [metrics.get(name, {}).get("mean", np.nan) for metrics in question_types.values()]
            positions = np.arange(len(question_types)) + (offset - (len(names) - 1) / 2) * width
            axes.bar(positions, means, width, label=name)
        axes.set_xticks(np.arange(len(question_types)),
                        [f"{qt}\nn={max(m['n'] for m in metrics.values())}" for qt, metrics in question_types.items()])
        axes.set_ylim(0, max(1.0, *(m.get("mean", 0) for metrics in question_types.values() for m in metrics.values())))
        axes.set_title(f"{task}: mean score per question type")
        axes.legend(fontsize="small", ncols=min(len(names), 3))
        paths.append(_save(figure, out / f"scores_{task}.png"))
    return paths


def plot_distributions(records: list[dict], out: Path) -> Path | None:
    """Histograms of every graded (not 0/1) per-sample metric, by task."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name in METRIC_SIGNATURES.keys() & record.keys():
            if record[name] is not None:
                values[name][record["task"]].append(record[name])
    graded = [name for name in METRIC_SIGNATURES if name in values and name not in ZERO_ONE_METRICS]
    if not graded:
        return None
    figure = Figure(figsize=(4.2 * len(graded), 3.4))
    for axes, name in zip(np.atleast_1d(figure.subplots(1, len(graded))), graded):
        for task, task_values in sorted(values[name].items()):
            axes.hist(task_values, bins=20, alpha=0.6, label=f"{task} (n={len(task_values)})")
        axes.set_title(name)
        axes.set_xlabel("per-sample score")
        axes.legend(fontsize="small")
    return _save(figure, out / "score_distributions.png")
