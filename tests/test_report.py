import json

import pytest

from evaluation.metrics import CORPUS_METRIC_SIGNATURES, METRIC_SIGNATURES
from common.files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from evaluation.report import aggregate, difference_headline, markdown_report, markdown_table, scored_line


def scored(task, question_type, **metrics):
    reference = "nothing has changed." if question_type == "difference" else "r"
    return {"sample_id": f"{task}-{question_type}", "task": task, "question_type": question_type,
            "question": "q?", "prediction": "p", "reference": reference, **metrics}


SCORED = [
    scored("diagnostic", "presence", closed_accuracy=1, closed_accuracy_llava_med=1, exact_match=1),
    scored("diagnostic", "presence", closed_accuracy=0, closed_accuracy_llava_med=1, exact_match=0),
    scored("diagnostic", "presence", closed_accuracy=1, closed_accuracy_llava_med=1, exact_match=0),
    scored("diagnostic", "location", token_recall=1.0, token_recall_clipped=0.5),
    scored("diagnostic", "location", token_recall=0.5, token_recall_clipped=0.5),
    scored("difference", "difference", difference_correct=1, difference_correct_with_levels=0,
           difference_parsed=1),
]


def test_aggregate_means_and_counts_per_question_type():
    presence = aggregate(SCORED)["by_task"]["diagnostic"]["presence"]
    assert presence["closed_accuracy"] == {"mean": pytest.approx(2 / 3), "n": 3}
    assert presence["exact_match"] == {"mean": pytest.approx(1 / 3), "n": 3}


def test_aggregate_only_lists_metrics_that_apply_to_a_question_type():
    location = aggregate(SCORED)["by_task"]["diagnostic"]["location"]
    assert location == {"token_recall": {"mean": 0.75, "n": 2},
                        "token_recall_clipped": {"mean": 0.5, "n": 2}}


def test_aggregate_overall_averages_each_metric_over_the_samples_it_applies_to():
    results = aggregate(SCORED)
    assert results["n_samples"] == 6
    assert results["overall"]["closed_accuracy"] == {"mean": pytest.approx(2 / 3), "n": 3}
    assert results["overall"]["difference_correct"] == {"mean": 1.0, "n": 1}


def test_aggregate_groups_question_types_under_their_task():
    by_task = aggregate(SCORED)["by_task"]
    assert {task: sorted(types) for task, types in by_task.items()} == {
        "diagnostic": ["location", "presence"], "difference": ["difference"]}


def test_aggregate_records_a_signature_for_each_reported_metric():
    results = aggregate(SCORED)
    assert results["signatures"] == ({name: METRIC_SIGNATURES[name] for name in results["overall"]}
                                     | {name: CORPUS_METRIC_SIGNATURES[name] for name in results["corpus"]["overall"]})


def test_aggregate_adds_corpus_scores_per_group():
    corpus = aggregate(SCORED)["corpus"]
    assert set(corpus["by_task"]["difference"]["difference"]) >= {"corpus_bleu4", "chexpert_added_f1"}
    assert "chexpert_added_f1" not in corpus["by_task"]["diagnostic"]["presence"]


def test_aggregate_result_round_trips_through_json():
    results = aggregate(SCORED)
    assert json.loads(json.dumps(results)) == results


def test_aggregate_averages_only_fields_named_in_metric_signatures():
    results = aggregate([scored("diagnostic", "level", token_recall=1.0, interval_days=30)])
    assert list(results["overall"]) == ["token_recall"]


def test_markdown_table_has_a_row_per_question_type_and_an_overall_row():
    table = markdown_table(aggregate(SCORED))
    assert "| diagnostic | location | – | – | – | 0.750 (n=2) | 0.500 (n=2) | – | – | – |" in table
    assert "| diagnostic | presence | 0.667 (n=3) | 1.000 (n=3) | 0.333 (n=3) |" in table
    assert ("| difference | difference | – | – | – | – | – | 1.000 (n=1) | 0.000 (n=1) | 1.000 (n=1) |"
            in table)
    assert table.splitlines()[-1].startswith("| **overall** |  | 0.667 (n=3) | 1.000 (n=3) | 0.333 (n=3) |")


def test_markdown_table_header_names_every_metric():
    header = markdown_table(aggregate(SCORED)).splitlines()[0]
    assert header == ("| Task | Question type | closed_accuracy | closed_accuracy_llava_med | exact_match | "
                      "token_recall | token_recall_clipped | difference_correct | difference_correct_with_levels | "
                      "difference_parsed |")


def test_write_json_atomic_writes_readable_json_and_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"overall": {"exact_match": {"mean": 0.5, "n": 2}}})
    assert json.loads(path.read_text()) == {"overall": {"exact_match": {"mean": 0.5, "n": 2}}}
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.json"]


def test_write_json_atomic_replaces_an_existing_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    write_json_atomic(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.json"]


def test_write_jsonl_atomic_writes_one_object_per_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_jsonl_atomic(path, [{"sample_id": "a"}, {"sample_id": "b"}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"sample_id": "a"}, {"sample_id": "b"}]


def test_write_text_atomic_creates_missing_directories(tmp_path):
    path = tmp_path / "run" / "results.md"
    write_text_atomic(path, "| a |\n")
    assert path.read_text() == "| a |\n"


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_jsonl_atomic(path, [{"sample_id": "a"}])
    with pytest.raises(ValueError):
        write_jsonl_atomic(path, [{"sample_id": "b"}, {"score": float("nan")}])
    assert path.read_text() == '{"sample_id": "a"}\n'
    assert [entry.name for entry in tmp_path.iterdir()] == ["samples.jsonl"]


def test_interrupted_write_keeps_the_previous_file_and_removes_its_temporary_file(
        tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    path.write_text("old")

    def interrupt(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr("common.files.os.fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.md"]


LIMITED = {"split": "test", "limit": 600, "sources": {"diffvqa": {"loaded": 910, "scored": 600},
                                                    "prognostic": {"loaded": 90, "scored": 90}}}


def report_of(records: list[dict]) -> str:
    return markdown_report(aggregate(records) | {"samples": LIMITED})


def test_scored_line_says_how_many_of_how_many_samples_were_scored_under_which_limit():
    assert scored_line(LIMITED) == ("Scored 690 of 1000 test samples (data.limit.test=600 per source; "
                                    "diffvqa: 600 of 910, prognostic: 90 of 90).")


def test_scored_line_names_an_absent_limit_null():
    samples = {"split": "val", "limit": None, "sources": {"diffvqa": {"loaded": 5, "scored": 5}}}
    assert scored_line(samples) == "Scored 5 of 5 val samples (data.limit.val=null per source; diffvqa: 5 of 5)."


def test_the_report_opens_with_the_scored_line():
    assert report_of(SCORED).splitlines()[0] == scored_line(LIMITED)


def test_the_report_lays_out_the_papers_tables_for_the_tasks_present():
    records = SCORED + [scored("prognostic", "prognostic", bleu4=0.2, rougeL=0.4, judge_score=6.0,
                               prognosis_correct=0, prognosis_f1=0.8),
                        scored("mmxu", "worsen", choice_accuracy=1, choice_parsed=1),
                        scored("mmxu", "improved", choice_accuracy=0, choice_parsed=0)]
    report = report_of(records)
    assert report.index("## Diagnostic questions") < report.index("## Difference and prognostic") \
        < report.index("## MMXU") < report.index("## Every metric")
    assert "## MMXU" not in report_of(SCORED)


def test_the_diagnostic_table_shows_each_mean_with_its_n():
    report = report_of(SCORED)
    assert "| presence | 3 | – | 0.667 (n=3) | 1.000 (n=3) | 0.333 (n=3) | – | – |" in report
    assert "| **all** | 5 | 0.750 (n=2) | 0.667 (n=3) | 1.000 (n=3) | 0.333 (n=3) | – | – |" in report


def test_the_two_image_table_shows_each_mean_with_its_n_and_each_label_f1_with_its_support():
    prognostic = scored("prognostic", "prognostic", bleu4=0.2, rougeL=0.4, judge_score=6.0, prognosis_f1=0.8)
    report = report_of(SCORED + [prognostic, prognostic | {"judge_score": None, "prognosis_correct": 0}])
    assert ("| prediction (prognostic) | 2 | 0.200 (n=2) | 0.000 | 0.400 (n=2) | 6.000 (n=1) | 0.000 (n=1) "
            "| 0.800 (n=2) | – | – |") in report
    assert "| n/a (support=0) | n/a (support=0) |" in report  # the difference row: no label in its reference, nothing to find


def test_the_mmxu_table_shows_accuracy_and_unparsed_rate_with_their_n():
    report = report_of([scored("mmxu", "worsen", choice_accuracy=1, choice_parsed=1),
                        scored("mmxu", "improved", choice_accuracy=0, choice_parsed=0)])
    assert "| **all** | 2 | 0.500 (n=2) | 0.500 (n=2) |" in report


def test_the_difference_headline_sets_the_models_hits_beside_the_most_common_answers():
    nothing = "nothing has changed."
    added = "the main image has an additional finding of pleural effusion than the reference image."
    level = "the level of edema has changed from mild to moderate."  # no finding added or missing
    records = [
        {"question_type": "difference", "reference": nothing, "difference_correct": 1},
        {"question_type": "difference", "reference": nothing, "difference_correct": 0},
        {"question_type": "difference", "reference": level, "difference_correct": 0},
        {"question_type": "difference", "reference": added, "difference_correct": 1},
        {"question_type": "presence", "reference": "yes", "closed_accuracy": 1},
    ]
    assert difference_headline(records) == (
        "Difference questions: added and missing findings right in 2 of 4 answers (0.500); the most common answer "
        "alone ('nothing has changed.') is right in 3 (0.750).")
    assert difference_headline(records[-1:]) is None
    outside = {"question_type": "difference", "reference": "worse", "difference_reference_parsed": 0}
    assert difference_headline([*records, outside]) == (
        "Difference questions: added and missing findings right in 2 of 4 answers (0.500); the most common answer "
        "alone ('nothing has changed.') is right in 3 (0.750). 1 reference outside the answer grammar is not "
        "scored on findings.")
