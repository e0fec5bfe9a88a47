"""Binary metrics against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from node.tasks.metrics import binary_metrics, roc_auc
from node.tasks.training import split_holdout


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pairs = list(itertools.product(s[y == 1], s[y == 0]))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.random(40), 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(brute_auc(y, s))


def test_confusion_metrics() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.2, 0.3, 0.4])
    m = binary_metrics(y, p, 0.5)  # tp 3, fn 1, fp 1, tn 5
    assert (m.n, m.positives) == (10, 4)
    assert m.accuracy == pytest.approx(0.8)
    assert m.sensitivity == pytest.approx(0.75)
    assert m.specificity == pytest.approx(5 / 6)
    assert m.mcc == pytest.approx((3 * 5 - 1 * 1) / math.sqrt(4 * 4 * 6 * 6))
    assert m.auc == pytest.approx(brute_auc(y, p))


def test_degenerate_cases() -> None:
    m = binary_metrics(np.array([1, 1]), np.array([0.9, 0.1]))
    assert math.isnan(m.auc) and math.isnan(m.specificity) and m.mcc == 0.0
    assert m.as_dict()["auc"] is None


def test_holdout_split_is_stratified_seeded_and_disjoint() -> None:
    y = np.array([0] * 30 + [1] * 10)
    train, held = split_holdout(y, 0.25, seed=3)
    assert set(train).isdisjoint(held) and len(train) + len(held) == 40
    assert (np.sum(y[held] == 0), np.sum(y[held] == 1)) == (8, 2)  # round(7.5) = 8
    again_train, again_held = split_holdout(y, 0.25, seed=3)
    np.testing.assert_array_equal(held, again_held)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(held, split_holdout(y, 0.25, seed=4)[1])
