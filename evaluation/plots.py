"""Plots of an evaluation (PNG): each task's scores per question type, and the distribution of every
graded (not 0/1) per-sample score, each mean and histogram with its n. Drawn with matplotlib's
object API (no pyplot state, no display), without legends (labels sit beside the data), and
written atomically."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.files import atomic_file
from evaluation.metrics import ZERO_ONE_METRICS, METRIC_SIGNATURES

PANELS_PER_ROW = 3


def _save(figure: Figure, path: Path) -> Path:
    with atomic_file(path) as staging:
        figure.savefig(staging, format="png", dpi=120, bbox_inches="tight")
    return path


def _score_panel(axes, question_type: str, metrics: dict, names: list[str], top: float) -> None:
    """Horizontal bars of one question type's metrics, each labelled with its mean and n. A mean of
    0 still gets its end tick and label; a metric that does not apply gets "n/a" and no bar."""
    colors = colormaps["tab20"].colors
    for row, name in enumerate(names):
        if name not in metrics:
            axes.text(0.02 * top, row, "n/a", va="center", color="grey", style="italic", fontsize="small")
            continue
        mean, n = metrics[name]["mean"], metrics[name]["n"]
        axes.barh(row, mean, color=colors[row % len(colors)], edgecolor="black", linewidth=0.8)
        # A tick at the bar's end, so that a bar of length 0 is seen to be there.
        axes.plot(mean, row, marker="|", markersize=12, markeredgewidth=2, color="black")
        axes.text(mean + 0.03 * top, row, f"{mean:.3f} (n={n})", va="center", fontsize="small")
    axes.set_yticks(range(len(names)), names)
    axes.set_ylim(len(names) - 0.5, -0.5)  # the first metric on top
    # 0 off the axis line, so the tick of a zero mean shows; room for the labels right of the bars.
    axes.set_xlim(-0.03 * top, 1.6 * top)
    ticks = MaxNLocator(4).tick_values(0, top)
    axes.set_xticks(ticks[ticks <= top])
    axes.set_title(f"{question_type} (n={max(summary['n'] for summary in metrics.values())})")


def score_figure(results: dict, task: str) -> Figure:
    """A task's scores (`report.aggregate` results): a panel per question type, a labelled bar per
    metric (mean and n), the metrics in the same rows of every panel."""
    question_types = results["by_task"][task]
    names = [name for name in results["overall"] if any(name in m for m in question_types.values())]
    top = max(1.0, *(summary["mean"] for metrics in question_types.values() for summary in metrics.values()))
    columns = min(PANELS_PER_ROW, len(question_types))
    rows = math.ceil(len(question_types) / columns)
    figure = Figure(figsize=(1.5 + 3.2 * columns, (0.6 + 0.3 * len(names)) * rows + 0.4), layout="constrained")
    panels = figure.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    for axes, (question_type, metrics) in zip(panels, question_types.items()):
        _score_panel(axes, question_type, metrics, names, top)
    for axes in panels[len(question_types):]:
        axes.set_visible(False)
    figure.suptitle(f"{task}: mean score per question type")
    return figure


def plot_by_question_type(results: dict, out: Path) -> list[Path]:
    """One PNG per task, `scores_<task>.png`: its `score_figure`."""
    return [_save(score_figure(results, task), out / f"scores_{task}.png") for task in results["by_task"]]


def distribution_figure(records: list[dict]) -> Figure | None:
    """Histograms of every graded (not 0/1) per-sample metric of scored records: a row per task, a
    column per metric, each panel with its own count axis (a small task stays visible beside a large
    one) and its n; None when no graded metric was scored."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name in METRIC_SIGNATURES.keys() & record.keys():
            if record[name] is not None:
                values[name][record["task"]].append(record[name])
    graded = [name for name in METRIC_SIGNATURES if name in values and name not in ZERO_ONE_METRICS]
    if not graded:
        return None
    tasks = sorted({task for name in graded for task in values[name]})
    figure = Figure(figsize=(3.6 * len(graded), 2.4 * len(tasks)), layout="constrained")
    panels = figure.subplots(len(tasks), len(graded), squeeze=False, sharex="col")
    for column, name in enumerate(graded):
        scores = [score for task_values in values[name].values() for score in task_values]
        bins = np.linspace(min(0.0, *scores), max(1.0, *scores), 21)
        for row, task in enumerate(tasks):
            axes, task_values = panels[row, column], values[name].get(task)
            if task_values:
                axes.hist(task_values, bins=bins, color=f"C{row}")
                axes.set_title(f"{task}: {name} (n={len(task_values)})", fontsize="medium")
            else:
                axes.text(0.5, 0.5, "n/a", transform=axes.transAxes, ha="center", va="center", color="grey")
                axes.set_title(f"{task}: {name}", fontsize="medium")
                axes.set_yticks([])
            if column == 0:
                axes.set_ylabel("samples")
            if row == len(tasks) - 1:
                axes.set_xlabel("per-sample score")
    return figure


def plot_distributions(records: list[dict], out: Path) -> Path | None:
    """`score_distributions.png`: the `distribution_figure` of the records, if there is one."""
    figure = distribution_figure(records)
    return None if figure is None else _save(figure, out / "score_distributions.png")
