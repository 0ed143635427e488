"""The drift test (MMD with a permutation p-value) on seeded samples: it keeps quiet when
both samples come from one distribution and speaks when a share of one comes from
elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from components.core.drift import mmd_test, projection


def _sample(rng, n: int, dims: int = 16, shift: float = 0.0) -> np.ndarray:
    return rng.standard_normal((n, dims)) + shift


def test_no_drift_raises_about_as_many_false_alarms_as_alpha_allows():
    p_values = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p_values.append(mmd_test(_sample(rng, 200), _sample(rng, 200), 200, seed).p_value)

    assert sum(p < 0.01 for p in p_values) <= 1
    assert 0.2 < np.median(p_values) < 0.8  # about uniform under no drift


def test_a_fifth_of_the_listings_from_elsewhere_is_drift():
    rng = np.random.default_rng(0)
    today = np.concatenate([_sample(rng, 160), _sample(rng, 40, shift=1.5)])

    test = mmd_test(_sample(rng, 200), today, 200)

    assert test.p_value < 0.01 and test.mmd2 > 0 and test.sizes == (200, 200)


def test_the_p_value_is_the_share_of_relabellings_at_least_as_extreme():
    rng = np.random.default_rng(3)
    same = mmd_test(_sample(rng, 50), _sample(rng, 50), 99, seed=1)

    assert same.p_value in {k / 100 for k in range(1, 101)}  # (1 + count) / (99 + 1)


def test_the_projection_is_fixed_by_its_seed_and_bad_samples_are_refused():
    np.testing.assert_array_equal(projection(100), projection(100))
    assert projection(100).shape == (100, 64)
    with pytest.raises(ValueError, match="two samples"):
        mmd_test(np.zeros((1, 4)), np.zeros((5, 4)), 10)
    with pytest.raises(ValueError, match="two samples"):
        mmd_test(np.zeros((5, 4)), np.zeros((5, 3)), 10)
