import json
import warnings
from dataclasses import asdict

import numpy as np
import pytest
from scipy import stats

from evaluation.compare import compare_runs, main, markdown
from evaluation.metrics import METRIC_SIGNATURES, ZERO_ONE_METRICS
from evaluation.stats import mcnemar, paired_bootstrap_ci, wilcoxon

SEEDS = range(12)


def seeded_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of two models on 5 to 120 samples, rounded so that ties and zero differences occur."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 121))
    a = np.round(rng.uniform(size=n), 1)
    return a, np.clip(np.round(a + rng.normal(0.05, 0.2, size=n), 1), 0, 1)


# ---------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("seed", SEEDS)
def test_bootstrap_interval_equals_scipy_bootstrap_of_the_differences(seed):
    a, b = seeded_pair(seed)
    interval = paired_bootstrap_ci(a, b, seed=seed)
    expected = stats.bootstrap((b - a,), np.mean, method="BCa", rng=np.random.default_rng(seed))
    assert interval.method == "BCa"
    assert (interval.low, interval.high) == pytest.approx(tuple(expected.confidence_interval),
                                                          abs=1e-12)


def test_bootstrap_interval_covers_the_true_difference_in_about_95_of_100_synthetic_draws():
    covered, widths = 0, []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        a = rng.normal(size=80)
        b = a + 0.3 + rng.normal(scale=0.5, size=80)  # true mean difference 0.3, se 0.056
        interval = paired_bootstrap_ci(a, b, n_resamples=999, seed=seed)
        covered += interval.low < 0.3 < interval.high
        widths.append(interval.high - interval.low)
    assert 90 <= covered <= 99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(80), rel=0.1)


def test_bootstrap_interval_is_reproducible_for_a_seed_and_varies_with_it():
    a, b = seeded_pair(3)
    assert paired_bootstrap_ci(a, b, seed=5) == paired_bootstrap_ci(a, b, seed=5)
    assert paired_bootstrap_ci(a, b, seed=5) != paired_bootstrap_ci(a, b, seed=6)


def test_bootstrap_interval_with_all_differences_equal_falls_back_to_percentile():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the degenerate BCa is handled, not warned about
        interval = paired_bootstrap_ci([0.0, 0.5, 1.0, 0.25], [0.5, 1.0, 1.5, 0.75])
    assert interval.method == "percentile"
    assert (interval.low, interval.high) == (0.5, 0.5)


def test_bootstrap_interval_of_identical_0_1_scores_is_zero_wide():
    interval = paired_bootstrap_ci([1, 0, 1, 1], [1, 0, 1, 1])
    assert (interval.low, interval.high, interval.method) == (0.0, 0.0, "percentile")


def test_bootstrap_interval_needs_two_samples():
    with pytest.raises(ValueError, match="at least two paired samples"):
        paired_bootstrap_ci([1.0], [0.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_wilcoxon_equals_scipy_wilcoxon(seed):
    a, b = seeded_pair(seed)
    expected = stats.wilcoxon(b, a, alternative="two-sided", method="auto")
    result = wilcoxon(a, b)
    assert not result.identical
    assert (result.statistic, result.p_value) == (expected.statistic, expected.pvalue)


def test_wilcoxon_exact_p_for_five_positive_differences_is_two_in_thirty_two():
    result = wilcoxon([0, 0, 0, 0, 0], [1, 2, 3, 4, 5])
    assert (result.statistic, result.p_value) == (0.0, 2 / 32)


def test_wilcoxon_of_all_zero_differences_is_identical_with_p_one_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = wilcoxon([0.5] * 60, [0.5] * 60)
    assert asdict(result) == {"statistic": None, "p_value": 1.0, "identical": True}


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_binomial_p():
    # 5 both right, 3 both wrong, 1 only A right, 9 only B right: p = 2 * (1 + 10) / 2**10.
    a = [1] * 5 + [0] * 3 + [1] + [0] * 9
    b = [1] * 5 + [0] * 3 + [0] + [1] * 9
    assert asdict(mcnemar(a, b)) == {"only_a": 1, "only_b": 9, "p_value": 22 / 1024}


@pytest.mark.parametrize("seed", SEEDS)
def test_mcnemar_equals_scipy_binomtest_on_the_discordant_pairs(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, size=(2, int(rng.integers(10, 200))))
    only_a, only_b = int(np.sum(a > b)), int(np.sum(b > a))
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    assert result.p_value == stats.binomtest(only_a, only_a + only_b, 0.5).pvalue


def test_mcnemar_without_discordant_pairs_has_p_one():
    assert asdict(mcnemar([1, 0, 1], [1, 0, 1])) == {"only_a": 0, "only_b": 0, "p_value": 1.0}


def test_mcnemar_refuses_scores_that_are_not_0_or_1():
    with pytest.raises(ValueError, match="sample 1 scores 0.5 and 1; use wilcoxon"):
        mcnemar([1, 0.5], [1, 1])


def test_paired_statistics_refuse_unequal_lengths_and_empty_scores():
    with pytest.raises(ValueError, match="one length"):
        wilcoxon([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no samples"):
        mcnemar([], [])


def test_statistics_are_json_ready():
    a, b = seeded_pair(0)
    for result in (paired_bootstrap_ci(a, b), wilcoxon(a, b), mcnemar(a > 0.5, b > 0.5)):
        fields = asdict(result)
        assert json.loads(json.dumps(fields, allow_nan=False)) == fields  # no NaN, no numpy types


def test_zero_one_metrics_are_known_metrics():
    assert ZERO_ONE_METRICS <= METRIC_SIGNATURES.keys()
    assert not {"token_recall", "token_recall_clipped"} & ZERO_ONE_METRICS


# ---------------------------------------------------------------------------------------------
# Comparing two run directories


def record(sample_id, task, question_type, **metrics):
    return {"sample_id": sample_id, "task": task, "question_type": question_type,
            "question": "q?", "prediction": "p", "reference": "r", **metrics}


RUN_A = [
    record("p1", "diagnostic", "presence", closed_accuracy=1),
    record("p2", "diagnostic", "presence", closed_accuracy=0),
    record("p3", "diagnostic", "presence", closed_accuracy=0),
    record("p4", "diagnostic", "presence", closed_accuracy=1),
    record("g1", "prognostic", "worsening", closed_accuracy=0),
    record("g2", "prognostic", "worsening", closed_accuracy=1),
    record("l1", "diagnostic", "location", token_recall=0.5),
    record("l2", "diagnostic", "location", token_recall=0.25),
    record("l3", "diagnostic", "location", token_recall=1.0),
    record("a-only", "diagnostic", "presence", closed_accuracy=1),
]
# B is written in another order: samples match by id, not by line.
RUN_B = [
    record("b-only-1", "diagnostic", "presence", closed_accuracy=0),
    record("l3", "diagnostic", "location", token_recall=1.0),
    record("l2", "diagnostic", "location", token_recall=0.75),
    record("l1", "diagnostic", "location", token_recall=0.5),
    record("g2", "prognostic", "worsening", closed_accuracy=1),
    record("g1", "prognostic", "worsening", closed_accuracy=0),
    record("p4", "diagnostic", "presence", closed_accuracy=0),
    record("p3", "diagnostic", "presence", closed_accuracy=1),
    record("p2", "diagnostic", "presence", closed_accuracy=1),
    record("p1", "diagnostic", "presence", closed_accuracy=1),
    record("b-only-2", "diagnostic", "location", token_recall=0.0),
]


def write_run(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / "run_a", RUN_A), write_run(tmp_path / "run_b", RUN_B)


def test_compare_matches_samples_by_id_and_lists_those_in_one_run_only(runs):
    samples = compare_runs(*runs)["samples"]
    assert samples == {"matched": 9, "only_in_a": ["a-only"], "only_in_b": ["b-only-1", "b-only-2"]}


def test_compare_0_1_metric_overall_gives_means_difference_b_minus_a_and_mcnemar(runs):
    # Matched closed_accuracy: A 1 0 0 1 0 1, B 1 1 1 0 0 1: p4 only A right, p2 and p3 only B.
    row = compare_runs(*runs)["overall"]["closed_accuracy"]
    assert (row["n"], row["mean_a"], row["mean_b"]) == (6, 0.5, pytest.approx(4 / 6))
    assert row["difference"] == pytest.approx(1 / 6)
    assert row["mcnemar"] == {"only_a": 1, "only_b": 2, "p_value": 1.0}
    a, b = np.array([1, 0, 0, 1, 0, 1]), np.array([1, 1, 1, 0, 0, 1])
    expected = stats.wilcoxon(b, a, alternative="two-sided", method="auto")
    assert row["wilcoxon"] == {"statistic": expected.statistic, "p_value": expected.pvalue, "identical": False}
    interval = stats.bootstrap((b - a,), np.mean, method="BCa", n_resamples=9999, rng=np.random.default_rng(0))
    assert row["bootstrap"] == {"low": pytest.approx(interval.confidence_interval.low, abs=1e-12),
                                "high": pytest.approx(interval.confidence_interval.high, abs=1e-12),
                                "confidence": 0.95, "method": "BCa", "n_resamples": 9999, "seed": 0}
    assert row["unpaired"] == 0


def test_compare_continuous_metric_has_no_mcnemar(runs):
    row = compare_runs(*runs)["overall"]["token_recall"]
    assert (row["n"], row["difference"], row["mcnemar"]) == (3, pytest.approx(0.5 / 3), None)
    assert row["wilcoxon"] == {"statistic": 0.0, "p_value": 1.0, "identical": False}


def test_compare_rows_per_task(runs):
    groups = compare_runs(*runs, by="task")["groups"]
    assert {group: sorted(rows) for group, rows in groups.items()} == {
        "diagnostic": ["closed_accuracy", "token_recall"], "prognostic": ["closed_accuracy"]}
    presence = groups["diagnostic"]["closed_accuracy"]
    assert (presence["n"], presence["difference"]) == (4, 0.25)
    unchanged = groups["prognostic"]["closed_accuracy"]
    assert unchanged["wilcoxon"] == {"statistic": None, "p_value": 1.0, "identical": True}
    assert (unchanged["bootstrap"]["low"], unchanged["bootstrap"]["high"],
            unchanged["bootstrap"]["method"]) == (0.0, 0.0, "percentile")


def test_compare_rows_per_question_type(runs):
    groups = compare_runs(*runs, by="question_type")["groups"]
    assert {group: sorted(rows) for group, rows in groups.items()} == {
        "location": ["token_recall"], "presence": ["closed_accuracy"],
        "worsening": ["closed_accuracy"]}


def test_compare_only_the_metrics_asked_for(runs):
    comparison = compare_runs(*runs, metrics=["token_recall"])
    assert list(comparison["overall"]) == ["token_recall"]
    assert comparison["groups"]["prognostic"] == {}


def test_compare_counts_matched_samples_scored_in_one_run_only(tmp_path):
    run_a = write_run(tmp_path / "a", [record("s1", "t", "q", token_recall=0.5),
                                       record("s2", "t", "q", token_recall=0.5)])
    run_b = write_run(tmp_path / "b", [record("s1", "t", "q", token_recall=1.0),
                                       record("s2", "t", "q")])
    comparison = compare_runs(run_a, run_b)
    assert (comparison["overall"]["token_recall"]["n"],
            comparison["overall"]["token_recall"]["unpaired"]) == (1, 1)
    assert "token_recall: 1 matched samples scored in only one run, left out." in markdown(comparison)


def test_cli_writes_markdown_and_json_into_run_b_and_prints_the_table(runs, capsys):
    run_a, run_b = runs
    comparison = main([str(run_a), str(run_b)])
    text = (run_b / "comparison.md").read_text()
    assert json.loads((run_b / "comparison.json").read_text()) == comparison
    assert text in capsys.readouterr().out
    assert "Samples matched by sample_id: 9; only in A: 1; only in B: 2" in text
    assert ("| Metric | Task | n | A | B | B − A | 95% CI | Wilcoxon p | McNemar |") in text
    assert ("| closed_accuracy | prognostic | 2 | 0.500 | 0.500 | +0.000 | "
            "[+0.000, +0.000] (percentile) | identical | 0 / 0, p=1 |") in text
    # scipy's BCa interval of the paired differences (0, 0.5, 0), the 9,999 resamples of seed 0.
    interval = stats.bootstrap((np.array([0.0, 0.5, 0.0]),), np.mean, method="BCa", n_resamples=9999,
                               rng=np.random.default_rng(0)).confidence_interval
    assert (f"| token_recall | **overall** | 3 | 0.583 | 0.750 | +0.167 | "
            f"[{interval.low:+.3f}, {interval.high:+.3f}] | 1 | – |") in text
    rows = [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| ")]
    assert rows[2:] == [["| closed_accuracy", "**overall**"], ["| closed_accuracy", "diagnostic"],
                        ["| closed_accuracy", "prognostic"], ["| token_recall", "**overall**"],
                        ["| token_recall", "diagnostic"]]


def test_cli_writes_into_out_when_given(runs, tmp_path):
    main([*map(str, runs), "--out", str(tmp_path / "report"), "--by", "question_type"])
    assert "| Metric | Question type |" in (tmp_path / "report" / "comparison.md").read_text()
    assert not (runs[1] / "comparison.md").exists()


def test_cli_names_a_run_directory_without_predictions(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs[0]), str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'empty' / 'predictions.jsonl'} does not exist" in capsys.readouterr().err


def test_runs_without_a_sample_in_common_are_an_error(runs):
    write_run(runs[1], [record("other", "diagnostic", "presence", closed_accuracy=1)])
    with pytest.raises(ValueError, match="share no sample_id: compare runs on the same split"):
        compare_runs(*runs)


def test_a_record_without_sample_id_is_an_error_naming_file_and_line(runs):
    run_a, run_b = runs
    write_run(run_b, [record("x", "t", "q"), {"task": "t", "question_type": "q"}])
    with pytest.raises(ValueError, match=rf"{run_b / 'predictions.jsonl'}, line 2: no 'sample_id'"):
        compare_runs(run_a, run_b)


def test_a_record_without_the_grouping_field_is_an_error(tmp_path):
    run = write_run(tmp_path / "a", [{"sample_id": "x", "task": "t"}])
    with pytest.raises(ValueError, match="line 1: no 'question_type' field"):
        compare_runs(run, run, by="question_type")


def test_a_line_that_is_not_json_is_an_error_naming_file_and_line(runs):
    (runs[0] / "predictions.jsonl").write_text(json.dumps(RUN_A[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"run_a/predictions.jsonl, line 2: not JSON"):
        compare_runs(*runs)


def test_a_repeated_sample_id_is_an_error(runs):
    write_run(runs[0], [RUN_A[0], RUN_A[1], RUN_A[0]])
    with pytest.raises(ValueError, match="line 3: sample_id 'p1' repeats line 1"):
        compare_runs(*runs)


def test_a_metric_that_is_not_a_number_is_an_error(runs):
    write_run(runs[1], [record("p1", "diagnostic", "presence", closed_accuracy="yes")])
    with pytest.raises(ValueError, match="run_b/predictions.jsonl, line 1: metric 'closed_accuracy'"):
        compare_runs(*runs)


def test_a_sample_in_different_groups_in_the_two_runs_is_an_error(runs):
    write_run(runs[1], [record("p1", "prognostic", "presence", closed_accuracy=1)])
    with pytest.raises(ValueError, match="sample 'p1' has task 'diagnostic' in .* but 'prognostic'"):
        compare_runs(*runs)


def test_asking_for_an_unknown_metric_or_one_a_run_lacks_is_an_error(runs):
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        compare_runs(*runs, metrics=["bleu"])
    with pytest.raises(ValueError, match="run_a/predictions.jsonl has no 'exact_match' scores"):
        compare_runs(*runs, metrics=["exact_match"])
