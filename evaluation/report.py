"""Results tables: per-sample scores averaged per task and question type, corpus-level scores of
the same groups, and Markdown tables laid out like the papers' (and one of every metric). The files
they go into are written with ``common.files``' atomic writers."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from evaluation.metrics import (
    CORPUS_METRIC_SIGNATURES, METRIC_SIGNATURES, corpus_metrics, parse_difference, same_change,
)


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
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in scored_records:
        groups[(record["task"], record["question_type"])].append(record)
    corpus_by_task: dict[str, dict] = {}
    for (task, question_type), records in sorted(groups.items()):
        corpus_by_task.setdefault(task, {})[question_type] = corpus_metrics(records)
    corpus = {"overall": corpus_metrics(scored_records) if scored_records else {}, "by_task": corpus_by_task}
    corpus_names = {name for group in [corpus["overall"]] for name in group}
    return {
        "n_samples": n_samples,
        "overall": {name: _summary(overall[name]) for name in names},
        "by_task": by_task,
        "corpus": corpus,
        "signatures": {name: METRIC_SIGNATURES[name] for name in names}
        | {name: CORPUS_METRIC_SIGNATURES[name] for name in CORPUS_METRIC_SIGNATURES if name in corpus_names},
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


def _pooled(groups: list[dict], name: str) -> dict | None:
    """Mean and n of a metric over several groups' summaries (each weighted by its n)."""
    summaries = [group[name] for group in groups if name in group]
    n = sum(summary["n"] for summary in summaries)
    return {"mean": math.fsum(s["mean"] * s["n"] for s in summaries) / n, "n": n} if n else None


def _n(groups: list[dict]) -> int:
    return max((summary["n"] for group in groups for summary in group.values()), default=0)


def _diagnostic_table(question_types: dict) -> list[str]:
    names = ("token_recall", "closed_accuracy", "closed_accuracy_llava_med", "exact_match", "bleu4", "rougeL")
    lines = ["## Diagnostic questions (one image)", "",
             _row(["Question type", "n", "Open: token recall", "Closed: accuracy", "Closed: LLaVA-Med rule",
                   "Closed: exact match", "BLEU-4", "ROUGE-L"]), _row(["---"] * 8)]
    for question_type, metrics in question_types.items():
        lines.append(_row([question_type, str(_n([metrics])), *(_cell(metrics.get(name)) for name in names)]))
    groups = list(question_types.values())
    lines.append(_row(["**all**", str(sum(_n([g]) for g in groups)), *(_cell(_pooled(groups, n)) for n in names)]))
    return lines


def _label_f1(corpus: dict, kind: str) -> str:
    """Micro F1 of the CheXpert labels of a kind, with its support (the reference's labels); n/a
    where the references name no such label, so there is nothing to find."""
    f1 = corpus.get(f"chexpert_{kind}_f1")
    if f1 is None:
        return "–"
    support = corpus[f"chexpert_{kind}_support"]
    return f"{'n/a' if support == 0 else f'{f1:.3f}'} (support={support})"


def _two_image_table(results: dict) -> list[str]:
    """LUMEN Table 1: difference and prediction questions by BLEU-4, ROUGE-L and the judge."""
    lines = ["## Difference and prognostic questions (two images)", "",
             _row(["Questions", "n", "BLEU-4", "corpus BLEU-4", "ROUGE-L", "Judge (1-10)", "Findings correct",
                   "Courses F1", "CheXpert added F1", "CheXpert missing F1"]), _row(["---"] * 10)]
    correct = {"difference": "difference_correct", "prognostic": "prognosis_correct"}
    for task, label in (("difference", "difference"), ("prognostic", "prediction (prognostic)")):
        if task not in results["by_task"]:
            continue
        groups = list(results["by_task"][task].values())
        corpus = results["corpus"]["by_task"][task]
        pooled_corpus = corpus[next(iter(corpus))] if len(corpus) == 1 else {}
        cells = [_cell(_pooled(groups, "bleu4")), f"{pooled_corpus['corpus_bleu4']:.3f}"
                 if "corpus_bleu4" in pooled_corpus else "–", _cell(_pooled(groups, "rougeL")),
                 _cell(_pooled(groups, "judge_score")), _cell(_pooled(groups, correct[task])),
                 _cell(_pooled(groups, "prognosis_f1")),
                 _label_f1(pooled_corpus, "added"), _label_f1(pooled_corpus, "missing")]
        lines.append(_row([label, str(sum(_n([g]) for g in groups)), *cells]))
    lines += ["", "Findings correct: for difference questions, the added and missing findings equal the "
              "reference's; for prognostic questions, every finding's expected course (and level) does, "
              "where the reference is in the offline answer grammar. Courses F1: per prognostic question, "
              "the F1 of the predicted findings' courses (with levels) against the reference's, averaged. "
              "Corpus BLEU-4 pools all the row's questions; CheXpert F1 is micro over the labels, support "
              "the number of reference labels."]
    return lines


def _mmxu_table(content_types: dict) -> list[str]:
    lines = ["## MMXU (single choice)", "", _row(["Content type", "n", "Accuracy", "Unparsed"]), _row(["---"] * 4)]
    groups = list(content_types.values())
    for name, metrics in [*content_types.items(), ("**all**", None)]:
        chosen = [metrics] if metrics is not None else groups
        accuracy, parsed = _pooled(chosen, "choice_accuracy"), _pooled(chosen, "choice_parsed")
        unparsed = f"{1 - parsed['mean']:.3f} (n={parsed['n']})" if parsed else "–"
        lines.append(_row([name, str(sum(_n([g]) for g in chosen)), _cell(accuracy), unparsed]))
    return lines


def scored_line(samples: dict) -> str:
    """How many of how many samples were scored, e.g. "Scored 600 of 910 test samples
    (data.limit.test=600 per source; diffvqa: 600 of 910).", from `samples` as eval.py records it:
    `{"split", "limit", "sources": {source: {"loaded", "scored"}}}`."""
    sources = samples["sources"].items()
    scored, loaded = (sum(counts[key] for _, counts in sources) for key in ("scored", "loaded"))
    per_source = ", ".join(f"{name}: {counts['scored']} of {counts['loaded']}" for name, counts in sources)
    limit = "null" if samples["limit"] is None else samples["limit"]
    return (f"Scored {scored} of {loaded} {samples['split']} samples "
            f"(data.limit.{samples['split']}={limit} per source; {per_source}).")


def difference_headline(records: list[dict]) -> str | None:
    """One line on the difference questions, what lumen exists for: how many answers name exactly the
    reference's added and missing findings, next to how many the split's most common reference answer
    (in practice "nothing has changed.") would get right if given to every question, a model that reads
    nothing. None without difference questions whose reference is in the grammar; those whose reference
    is not are said apart."""
    questions = [record for record in records if record["question_type"] == "difference"]
    scored = [record for record in questions if "difference_correct" in record]
    if not scored:
        return None
    right = sum(record["difference_correct"] for record in scored)
    common, _ = Counter(record["reference"] for record in scored).most_common(1)[0]
    expected = parse_difference(common)
    baseline = sum(same_change(expected, parse_difference(record["reference"]), compare_levels=False)
                   for record in scored)
    n, unparsed = len(scored), len(questions) - len(scored)
    return (f"Difference questions: added and missing findings right in {right} of {n} answers ({right / n:.3f}); "
            f"the most common answer alone ({common!r}) is right in {baseline} ({baseline / n:.3f})."
            + (f" {unparsed} reference{'s' if unparsed > 1 else ''} outside the answer grammar "
               f"{'are' if unparsed > 1 else 'is'} not scored on findings." if unparsed else ""))


def markdown_report(results: dict) -> str:
    """How many samples were scored (`scored_line` of `results["samples"]`), then the tables a paper
    would show, for the tasks present: diagnostic questions by type (LUMEN's open recall and closed
    accuracy, with closed accuracy by LLaVA-Med's rule beside it), difference and prognostic
    questions (LUMEN Table 1's BLEU-4, ROUGE-L and judge), MMXU by content type (accuracy and the
    unparsed rate); then every metric. Each mean shows its n."""
    sections = [[scored_line(results["samples"])]]
    if "diagnostic" in results["by_task"]:
        sections.append(_diagnostic_table(results["by_task"]["diagnostic"]))
    if {"difference", "prognostic"} & results["by_task"].keys():
        sections.append(_two_image_table(results))
    if "mmxu" in results["by_task"]:
        sections.append(_mmxu_table(results["by_task"]["mmxu"]))
    sections.append(["## Every metric (mean and number of samples)", "", markdown_table(results).rstrip()])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
