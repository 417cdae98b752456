"""The LDS metric against hand-computed values and scipy; ground truth by real retraining."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from daunce_core import ClassificationTask, DaunceError, TrainConfig
from daunce_core.baselines.methods import influence
from daunce_core.evaluation.lds import lds_subsets, linear_datamodeling_score, retrain_on_subsets
from daunce_core.evaluation.metrics import roc_auc, spearman_columns
from daunce_core.evaluation.problems import logistic_regression, retrained_outcomes


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 30), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_spearman_matches_scipy_with_ties(rows, cols, seed, ties):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(rows, cols)), rng.normal(size=(rows, cols))
    if ties:
        a, b = np.round(a), np.round(b * 2)
    ours = spearman_columns(a, b)
    for j in range(cols):
        if np.ptp(a[:, j]) == 0 or np.ptp(b[:, j]) == 0:
            assert np.isnan(ours[j])
        else:
            assert ours[j] == pytest.approx(spearmanr(a[:, j], b[:, j]).statistic, abs=1e-12)


def test_lds_by_hand():
    scores = np.array([[1.0], [2.0], [-1.0], [0.5]])  # n = 4 train, m = 1 query
    subsets = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=bool)
    # predicted Σ scores: 3.0, -0.5, 0.0 → ranks 3, 1, 2; outcomes ranks 2, 1, 3
    outcomes = np.array([[0.2], [0.1], [0.3]])
    result = linear_datamodeling_score(scores, subsets, outcomes)
    # Spearman of (3, 1, 2) with (2, 1, 3): 1 − 6·Σd²/(n(n²−1)) = 1 − 6·2/24 = 0.5
    assert result.per_query[0] == pytest.approx(0.5)
    assert result.mean == pytest.approx(0.5)


def test_perfect_and_reversed_scores_and_seed_averaging():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(30, 4))
    subsets = lds_subsets(30, 50, seed=1)
    outcomes = subsets @ weights
    noisy = np.stack([outcomes + 0.01 * rng.normal(size=outcomes.shape) for _ in range(3)], 1)
    assert linear_datamodeling_score(weights, subsets, outcomes).mean == pytest.approx(1.0)
    assert linear_datamodeling_score(-weights, subsets, outcomes).mean == pytest.approx(-1.0)
    assert linear_datamodeling_score(weights, subsets, noisy).mean > 0.99


def test_subsets_are_deterministic_halves():
    masks = lds_subsets(101, 20, alpha=0.5, seed=3)
    assert masks.shape == (20, 101)
    assert (masks.sum(axis=1) == 50).all()
    np.testing.assert_array_equal(masks, lds_subsets(101, 20, alpha=0.5, seed=3))
    assert not np.array_equal(masks, lds_subsets(101, 20, alpha=0.5, seed=4))
    with pytest.raises(DaunceError, match="at least 2 subsets"):
        lds_subsets(10, 1)
    with pytest.raises(DaunceError, match="shapes do not match"):
        linear_datamodeling_score(np.zeros((5, 2)), masks, np.zeros((20, 2)))


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_vectorised_retraining_equals_one_model_at_a_time():
    prob = logistic_regression(n=40, m=6)
    data = {k: v.float() if v.is_floating_point() else v for k, v in prob.train.items()}
    queries = {k: v.float() if v.is_floating_point() else v for k, v in prob.queries.items()}
    subsets = lds_subsets(40, 4, seed=0)
    config = TrainConfig(lr=0.1, epochs=3, batch_size=8)
    task = ClassificationTask()
    together = retrain_on_subsets(_mlp, task, data, queries, subsets, config, seeds=2)
    alone = retrain_on_subsets(_mlp, task, data, queries, subsets, config, seeds=2, group_size=1)
    assert together.shape == (4, 2, 6)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert np.ptp(together, axis=0).max() > 1e-3  # different subsets, different models


def test_exact_influence_reaches_a_high_lds_on_logistic_regression():
    prob = logistic_regression(n=80, m=15, l2=1e-2)
    subsets = lds_subsets(80, 40, seed=0)

    outcomes = retrained_outcomes(prob, subsets)
    exact_influence = influence(prob.model, prob.task, prob.train, prob.queries, l2=prob.l2)
    good = linear_datamodeling_score(exact_influence, subsets, outcomes)
    assert good.mean > 0.7
    shuffled = np.random.default_rng(0).permutation(exact_influence)
    assert linear_datamodeling_score(shuffled, subsets, outcomes).mean < 0.3


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 60), st.integers(0, 2**31 - 1), st.booleans())
def test_roc_auc_matches_sklearn(size, seed, ties):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    scores = rng.normal(size=size)
    scores = np.round(scores) if ties else scores
    positive = rng.random(size) < 0.3
    positive[0], positive[1] = True, False
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    with pytest.raises(DaunceError, match="both positives and negatives"):
        roc_auc(scores, np.zeros(size, dtype=bool))
