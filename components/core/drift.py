"""Has the catalog drifted from what the model was trained on? A two-sample test on
listing profiles, pure numpy.

A listing's profile is its frozen encoders' view features, the mean of its unit image
features and the mean of its unit text features, each normalised, concatenated and
projected to a few dimensions by a fixed random matrix (distances are kept, by
Johnson-Lindenstrauss). Two samples of profiles, the training catalog's and today's,
are compared with the maximum mean discrepancy (MMD) under a Gaussian kernel whose width
is the median distance between all the profiles; its p-value is the share of random
relabellings of the pooled sample whose MMD is at least as large (a permutation test,
Gretton et al., 2012). Under no drift the p-value is uniform: `alpha` 0.01 raises a
false alarm once in a hundred refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROFILE_DIMS = 64


def projection(input_dim: int, seed: int = 0, dims: int = PROFILE_DIMS) -> np.ndarray:
    """The fixed random projection of profiles: [input_dim, dims], seeded."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((input_dim, dims)) / np.sqrt(dims)).astype(np.float32)


@dataclass(frozen=True)
class DriftTest:
    mmd2: float  # the unbiased MMD^2 of the two samples
    p_value: float
    permutations: int
    sizes: tuple[int, int]


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int = 0) -> DriftTest:
    """The permutation test of "x and y come from one distribution" (rows: samples).

    Raises:
        ValueError: a sample with fewer than 2 rows, or of another width.
    """
    if len(x) < 2 or len(y) < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"two samples of 2+ rows of one width needed, got {x.shape}, {y.shape}")
    pooled = np.concatenate([x, y]).astype(np.float64)
    squared = np.square(pooled).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * pooled @ pooled.T, 0.0)
    width = np.median(distances[np.triu_indices(len(pooled), k=1)])
    kernel = np.exp(-distances / max(width, 1e-12))
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out self-pairs
    n, m = len(x), len(y)
    rng = np.random.default_rng(seed)
    labels = np.zeros((len(pooled), permutations + 1), dtype=np.float64)
    labels[:n, 0] = 1.0
    for column in range(1, permutations + 1):
        labels[rng.permutation(len(pooled))[:n], column] = 1.0
    statistics = _mmd2(kernel, labels, n, m)
    observed = statistics[0]
    p_value = (1 + np.sum(statistics[1:] >= observed)) / (permutations + 1)
    return DriftTest(float(observed), float(p_value), permutations, (n, m))


def _mmd2(kernel: np.ndarray, in_x: np.ndarray, n: int, m: int) -> np.ndarray:
    """Unbiased MMD^2 for each labelling (a column of `in_x`: 1 marks x's rows), from the
    kernel matrix with a zero diagonal, all labellings at once."""
    in_y = 1.0 - in_x
    kx, ky = kernel @ in_x, kernel @ in_y
    xx = np.sum(in_x * kx, axis=0) / (n * (n - 1))
    yy = np.sum(in_y * ky, axis=0) / (m * (m - 1))
    xy = np.sum(in_x * ky, axis=0) / (n * m)
    return xx + yy - 2 * xy
