import json
import warnings
from dataclasses import asdict

import numpy as np
import pytest
from scipy import stats

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
        json.dumps(asdict(result), allow_nan=False)


def test_zero_one_metrics_are_known_metrics():
    assert ZERO_ONE_METRICS <= METRIC_SIGNATURES.keys()
    assert not {"token_recall", "token_recall_clipped"} & ZERO_ONE_METRICS
