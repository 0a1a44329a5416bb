"""Drift statistics: PSI / KL with smoothing, quantile bins, the RBF-kernel MMD test."""

from __future__ import annotations

import math

import numpy as np

from finetune_jax.evaluation import drift_statistics


def test_psi_and_kl_are_zero_for_equal_histograms_and_finite_with_empty_bins():
    counts = np.asarray([10, 20, 30])
    assert (
        drift_statistics.psi(counts, counts) == 0.0 and drift_statistics.kl(counts, counts) == 0.0
    )
    assert (
        0 < drift_statistics.psi(counts, 2 * counts) < 1e-3
    )  # the smoothing weighs less with more rows
    shifted = drift_statistics.psi([100, 0, 0], [0, 0, 100])
    assert math.isfinite(shifted) and shifted > drift_statistics.psi([100, 0, 0], [90, 10, 0]) > 0
    p, q = drift_statistics.smoothed([9, 1]), drift_statistics.smoothed([5, 5])
    assert np.isclose(drift_statistics.kl([9, 1], [5, 5]), np.sum(q * np.log(q / p)))
    assert np.isclose(
        drift_statistics.psi([9, 1], [5, 5]),
        drift_statistics.kl([9, 1], [5, 5]) + drift_statistics.kl([5, 5], [9, 1]),
    )


def test_quantile_bins_split_the_reference_evenly():
    reference = np.arange(1000)
    edges = drift_statistics.quantile_edges(reference, bins=10)
    counts = drift_statistics.binned(reference, edges)
    assert len(counts) == 10 and counts.sum() == 1000 and counts.max() - counts.min() <= 1
    assert drift_statistics.binned(np.asarray([-5, 5000]), edges).tolist() == [1] + [0] * 8 + [1]


def test_mmd2_matches_the_unbiased_estimate_written_out():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 1
    result = drift_statistics.mmd_test(x, y, permutations=10)
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * result.bandwidth**2))  # noqa: E731
    xx = sum(k(a, b) for i, a in enumerate(x) for j, b in enumerate(x) if i != j) / 20
    yy = sum(k(a, b) for i, a in enumerate(y) for j, b in enumerate(y) if i != j) / 12
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert np.isclose(result.mmd2, xx + yy - 2 * xy)
    pooled = np.concatenate([x, y])
    distances = [np.linalg.norm(a - b) for i, a in enumerate(pooled) for b in pooled[i + 1 :]]
    assert np.isclose(result.bandwidth, np.median(distances))


def test_mmd_test_separates_shifted_samples_and_not_equal_ones():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same = drift_statistics.mmd_test(x, y, permutations=200, max_rows=200)
    shifted = drift_statistics.mmd_test(x, y + 0.5, permutations=200, max_rows=200)
    assert same.p_value > 0.01 and shifted.p_value < 0.01
    assert same.sizes == (200, 200) and shifted.p_value == 1 / 201  # no permutation beat it
    assert drift_statistics.mmd_test(x, y, permutations=200, max_rows=200) == same  # fixed seed
