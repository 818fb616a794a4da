"""Refitting the head and the exact-retraining check on small problems."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from segflu_core.influence.head import HeadParams, refit_head
from segflu_core.influence.hessian import factor_hessian, head_hessian
from segflu_core.influence.retrain import COLUMNS, correlation_summary, exact_influence_check
from tests.test_influence_math import brute_conditional_loss, brute_objective, random_params, random_sentences

L2 = 0.05


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(5)
    params = random_params(rng)
    features, labels = random_sentences(rng, rng.integers(1, 6, size=30))
    return params, features, labels


@pytest.fixture(scope="module")
def minimum(problem):
    params, features, labels = problem
    fitted, info = refit_head(params, features, labels, l2=L2, tolerance=1e-8)
    assert info["converged"]
    return fitted


def brute_removed_gradient(params: HeadParams, features, labels, removed) -> np.ndarray:
    """∇ of J minus (1/N)·CL of the removed segments, by enumeration and autograd."""
    tensors = params.to_torch(requires_grad=True)
    objective = brute_objective(tensors, features, labels, L2)
    for s, a, b in removed:
        objective = objective - brute_conditional_loss(tensors, features[s], labels[s], a, b) / len(features)
    gradients = torch.autograd.grad(objective, tensors)
    return np.concatenate([g.numpy().ravel() for g in gradients])


def test_refit_reaches_tolerance(problem):
    params, features, labels = problem
    fitted, info = refit_head(params, features, labels, l2=L2, tolerance=1e-6)
    assert info["converged"]
    assert info["max_abs_gradient"] <= 1e-6
    assert np.abs(brute_removed_gradient(fitted, features, labels, [])).max() <= 1e-6


@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "preconditioned"])
def test_refit_removed_segment(problem, minimum, preconditioned):
    _, features, labels = problem
    removed = [(4, 0, 1), (7, 0, len(labels[7]))]
    factor = factor_hessian(head_hessian(minimum, features, labels, l2=L2)) if preconditioned else None
    fitted, info = refit_head(minimum, features, labels, l2=L2, tolerance=1e-7, removed=removed, preconditioner=factor)
    assert info["converged"]
    assert np.abs(brute_removed_gradient(fitted, features, labels, removed)).max() <= 1e-7
    assert not np.allclose(fitted.flatten(), minimum.flatten())


def test_refit_reports_non_convergence(problem):
    params, features, labels = problem
    _, info = refit_head(params, features, labels, l2=L2, tolerance=1e-8, max_iterations=2)
    assert not info["converged"]
    assert info["max_abs_gradient"] > 1e-8
    assert info["iterations"] <= 2


def test_check_predicts_retraining(problem, minimum):
    _, features, labels = problem
    factor = factor_hessian(head_hessian(minimum, features, labels, l2=L2))
    test_items = [(0, 0, 1), (1, 0, len(labels[1])), (2, 0, 1)]
    train_items = [(s, 0, 1) for s in range(3, 11)] + [(12, 0, len(labels[12])), (3, 0, 1)]
    frame = exact_influence_check(
        minimum, features, labels, test_items, train_items, l2=L2, hessian_factor=factor, tolerance=1e-8, progress=False
    )
    assert list(frame.columns) == COLUMNS
    assert len(frame) == len(test_items) * len(train_items)
    summary = correlation_summary(frame)
    assert summary["pearson"] > 0.99
    assert summary["n"] == len(frame)
    assert (frame["max_abs_gradient"] <= 1e-8).all()
    # the repeated train item reuses one retraining
    repeated = frame[(frame.train_sentence == 3) & (frame.train_start == 0)]
    assert len(repeated) == 2 * len(test_items)
    assert repeated.groupby("test_sentence")["actual"].nunique().eq(1).all()


def test_check_with_separate_test_sentences(problem, minimum):
    _, features, labels = problem
    rng = np.random.default_rng(9)
    test_features, test_labels = random_sentences(rng, [3, 4])
    frame = exact_influence_check(
        minimum,
        features,
        labels,
        [(0, 1, 2), (1, 0, 4)],
        [(5, 0, 1)],
        l2=L2,
        test_features=test_features,
        test_labels=test_labels,
        tolerance=1e-7,
        progress=False,
    )
    assert frame["test_sentence"].tolist() == [0, 1]
    assert np.isfinite(frame["predicted"]).all()
    assert np.isfinite(frame["actual"]).all()


def test_check_rejects_non_minimum(problem):
    params, features, labels = problem
    with pytest.raises(ValueError, match="refit the head"):
        exact_influence_check(params, features, labels, [(0, 0, 1)], [(1, 0, 1)], l2=L2, progress=False)


def test_correlation_summary_by_hand():
    frame = pd.DataFrame({"predicted": [1.0, -2.0, 3.0, 0.5], "actual": [2.0, -1.0, 2.5, -0.1]})
    summary = correlation_summary(frame)
    assert summary["pearson"] == pytest.approx(np.corrcoef(frame.predicted, frame.actual)[0, 1])
    # ranks of predicted are 3, 1, 4, 2 and of actual 3, 1, 4, 2
    assert summary["spearman"] == pytest.approx(1.0)
    assert summary["sign_agreement"] == pytest.approx(0.75)
    assert summary["n"] == 4


def test_correlation_summary_constant_column():
    summary = correlation_summary(pd.DataFrame({"predicted": [1.0, 1.0], "actual": [0.0, 2.0]}))
    assert np.isnan(summary["pearson"])
    assert summary["n"] == 2


def test_refit_from_minimum_keeps_it(problem, minimum):
    _, features, labels = problem
    fitted, info = refit_head(minimum, features, labels, l2=L2, tolerance=1e-6)
    assert info["iterations"] == 0
    assert info["converged"]
    np.testing.assert_array_equal(fitted.flatten(), minimum.flatten())
