"""Drift statistics between a reference sample (what the model was validated on) and new
data: population stability (PSI) and KL divergence of binned distributions, and a kernel
two-sample test (MMD) on the pooled features the classifier head reads.

Smoothing: every binned distribution adds 0.5 to each bin's count before normalising
(Jeffreys / Krichevsky-Trofimov), so an empty bin gives a finite PSI and KL.
MMD: RBF kernel k(x, y) = exp(-|x - y|^2 / (2 s^2)), s = the median pairwise distance of the
pooled sample (median heuristic); the unbiased MMD^2 estimate; p-value = (1 + #{permuted
MMD^2 >= observed}) / (1 + permutations), labels permuted with a fixed seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SMOOTHING = 0.5  # pseudo-count added to every bin


def smoothed(counts: np.ndarray) -> np.ndarray:
    """Bin proportions with `SMOOTHING` added to every count."""
    counts = np.asarray(counts, np.float64) + SMOOTHING
    return counts / counts.sum()


def psi(reference_counts: np.ndarray, new_counts: np.ndarray) -> float:
    """Population stability index sum((q - p) ln(q / p)) of two histograms (same bins)."""
    p, q = smoothed(reference_counts), smoothed(new_counts)
    return float(np.sum((q - p) * np.log(q / p)))


def kl(reference_counts: np.ndarray, new_counts: np.ndarray) -> float:
    """KL(new || reference) = sum(q ln(q / p)) of two histograms (same bins), in nats."""
    p, q = smoothed(reference_counts), smoothed(new_counts)
    return float(np.sum(q * np.log(q / p)))


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (deduplicated): each of `bins` bins
    holds about as many reference values, the outer bins are open-ended."""
    inner = np.quantile(np.asarray(reference, np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(inner)


def binned(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of `values` in the bins the inner `edges` make (len(edges) + 1 bins)."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def _squared_distances(z: np.ndarray) -> np.ndarray:
    sq = np.sum(z * z, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


@dataclasses.dataclass(frozen=True)
class MMDResult:
    mmd2: float  # unbiased MMD^2 estimate
    p_value: float
    bandwidth: float  # the kernel's s
    permutations: int
    sizes: tuple[int, int]  # rows of each sample used (after subsampling)


def mmd_test(
    x: np.ndarray, y: np.ndarray, permutations: int = 500, max_rows: int = 1000, seed: int = 0
) -> MMDResult:
    """RBF-kernel MMD two-sample test of x [n, d] vs y [m, d] (see module docstring); each
    sample is first subsampled to at most `max_rows` rows (fixed seed) to bound the cost."""
    rng = np.random.default_rng(seed)
    x, y = (_subsample(a, max_rows, rng) for a in (x, y))
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"the MMD test needs 2+ rows per sample, got {n} and {m}")
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = _squared_distances(z)
    off_diagonal = d2[~np.eye(n + m, dtype=bool)]
    bandwidth = float(np.sqrt(np.median(off_diagonal))) or 1.0
    kernel = np.exp(-d2 / (2.0 * bandwidth**2))
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out k(x_i, x_i)
    labels = np.zeros((permutations + 1, n + m))
    labels[0, :n] = 1.0
    for i in range(1, permutations + 1):
        labels[i, rng.permutation(n + m)[:n]] = 1.0
    stats = _mmd2(kernel, labels, n, m)
    p_value = (1.0 + np.sum(stats[1:] >= stats[0])) / (1.0 + permutations)
    return MMDResult(float(stats[0]), float(p_value), bandwidth, permutations, (n, m))


def _mmd2(kernel: np.ndarray, a: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD^2 for each row of indicator vectors `a` (1 = first sample), all at once;
    `kernel` has a zero diagonal."""
    b = 1.0 - a
    ka, kb = a @ kernel, b @ kernel
    xx = np.sum(ka * a, axis=1) / (n * (n - 1))
    yy = np.sum(kb * b, axis=1) / (m * (m - 1))
    xy = np.sum(ka * b, axis=1) / (n * m)
    return xx + yy - 2.0 * xy


def _subsample(a: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    if len(a) <= max_rows:
        return a
    return a[np.sort(rng.choice(len(a), max_rows, replace=False))]
