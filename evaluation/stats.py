"""Paired statistics on per-sample scores of two models on the same samples: a bootstrap interval
of the mean difference, the Wilcoxon signed-rank test and McNemar's exact test.

Every function takes the two models' scores in the same sample order, `a` then `b`; differences
are always `b - a` (positive: b scores higher). Results are small frozen dataclasses of plain
Python numbers, JSON-ready through `dataclasses.asdict`, never NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Bootstrap memory grows as resamples x samples; resampling in batches of at most this many
# values keeps a 20k-sample test set in tens of MB. Batching does not change the drawn resamples.
_VALUES_PER_BATCH = 2**22


@dataclass(frozen=True)
class BootstrapInterval:
    """Confidence interval of mean(b - a); `method` is "BCa" or "percentile" (used when the BCa
    interval is undefined, e.g. when every difference is equal)."""

    low: float
    high: float
    confidence: float
    method: str
    n_resamples: int
    seed: int


@dataclass(frozen=True)
class SignedRankTest:
    """Two-sided Wilcoxon signed-rank test of b - a. `identical` when every difference is zero:
    there is nothing to rank, so the statistic is None and p is 1.0."""

    statistic: float | None
    p_value: float
    identical: bool


@dataclass(frozen=True)
class McNemarTest:
    """Exact McNemar test: a binomial test (p = 1/2) on the discordant pairs. `only_a` counts the
    samples scored 1 by a and 0 by b, `only_b` the reverse; p is 1.0 when there are none."""

    only_a: int
    only_b: int
    p_value: float


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired scores need two 1-D sequences of one length, got shapes {a.shape} "
                         f"and {b.shape}; pass the two models' scores in the same sample order")
    if a.size == 0:
        raise ValueError("paired scores are empty: there are no samples to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores contain NaN or infinity; score every sample with a number")
    return a, b


def _mean_difference(a, b, axis=-1):
    # The mean of the differences, not the difference of the means: equal in exact arithmetic,
    # but only this one gives bit-identical resample statistics when all differences are equal
    # (so that BCa's degeneracy is seen) and ties between resamples that BCa counts exactly.
    return np.mean(b - a, axis=axis)


def paired_bootstrap_ci(a, b, confidence: float = 0.95, n_resamples: int = 9999,
                        seed: int = 0) -> BootstrapInterval:
    """Bootstrap confidence interval of mean(b) - mean(a), resampling samples (pairs) jointly.

    BCa by default; where BCa is undefined (scipy returns NaN, e.g. all differences equal, so the
    jackknife has no spread) the percentile interval of the same resamples is returned instead.
    Needs at least two samples. Reproducible for a given seed.
    """
    a, b = _paired(a, b)
    if a.size < 2:
        raise ValueError("a bootstrap interval needs at least two paired samples, got 1")
    method = "BCa"
    low, high = _bootstrap(a, b, confidence, n_resamples, seed, method)
    if np.isnan(low) or np.isnan(high):
        method = "percentile"
        low, high = _bootstrap(a, b, confidence, n_resamples, seed, method)
    return BootstrapInterval(float(low), float(high), confidence, method, n_resamples, seed)


def _bootstrap(a, b, confidence, n_resamples, seed, method) -> tuple[float, float]:
    # A degenerate BCa interval (its acceleration is 0/0) comes back as NaN, which the caller
    # replaces; the warnings on the way there would only alarm the reader.
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((a, b), _mean_difference, paired=True, vectorized=True,
                                 confidence_level=confidence, n_resamples=n_resamples,
                                 batch=max(1, _VALUES_PER_BATCH // a.size), method=method,
                                 rng=np.random.default_rng(seed))
    return result.confidence_interval


def wilcoxon(a, b) -> SignedRankTest:
    """Two-sided Wilcoxon signed-rank test of b - a (`scipy.stats.wilcoxon`, method "auto": exact
    for small samples, the normal approximation above 50; zero differences are dropped)."""
    a, b = _paired(a, b)
    if np.all(a == b):
        # scipy returns NaN (or a warning) here; no difference at all is a result, not an error.
        return SignedRankTest(statistic=None, p_value=1.0, identical=True)
    result = stats.wilcoxon(b, a, alternative="two-sided", method="auto")
    return SignedRankTest(statistic=float(result.statistic), p_value=float(result.pvalue),
                          identical=False)


def mcnemar(a, b) -> McNemarTest:
    """Exact McNemar test of two 0/1 scores (e.g. correct/wrong) on the same samples."""
    a, b = _paired(a, b)
    not_binary = ~(np.isin(a, (0, 1)) & np.isin(b, (0, 1)))
    if not_binary.any():
        index = int(np.argmax(not_binary))
        raise ValueError(f"McNemar needs 0/1 scores; sample {index} scores {a[index]:g} and "
                         f"{b[index]:g}; use wilcoxon for continuous scores")
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    discordant = only_a + only_b
    p_value = float(stats.binomtest(only_a, discordant).pvalue) if discordant else 1.0
    return McNemarTest(only_a=only_a, only_b=only_b, p_value=p_value)
