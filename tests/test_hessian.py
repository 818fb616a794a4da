"""Exact Hessian of the head objective against autograd, and its Cholesky solves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segflu_core.influence.head import HeadParams
from segflu_core.influence.hessian import factor_hessian, head_hessian, solve, solve_params
from tests.test_influence_math import DIM, NUM_TAGS, brute_objective, random_params, random_sentences


def autograd_hessian(params: HeadParams, features, labels, l2: float) -> np.ndarray:
    """∇²J by torch.autograd.functional.hessian of the enumerated objective."""
    sizes = [NUM_TAGS * DIM, NUM_TAGS, NUM_TAGS * NUM_TAGS, NUM_TAGS, NUM_TAGS]

    def objective(vector: torch.Tensor) -> torch.Tensor:
        weight, bias, transitions, start, end = torch.split(vector, sizes)
        tensors = (weight.reshape(NUM_TAGS, DIM), bias, transitions.reshape(NUM_TAGS, NUM_TAGS), start, end)
        return brute_objective(tensors, features, labels, l2)

    vector = torch.tensor(params.flatten())
    return torch.autograd.functional.hessian(objective, vector).numpy()


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(3)
    params = random_params(rng)
    features, labels = random_sentences(rng, [1, 2, 3, 3, 4, 5, 2])
    return params, features, labels


@pytest.fixture(scope="module")
def expected_hessian(problem) -> np.ndarray:
    params, features, labels = problem
    return autograd_hessian(params, features, labels, 0.2)


@pytest.mark.parametrize("max_batch_tokens", [1, 4, 1000])
def test_hessian_matches_autograd(problem, expected_hessian, max_batch_tokens):
    params, features, labels = problem
    actual = head_hessian(params, features, labels, l2=0.2, max_batch_tokens=max_batch_tokens)
    expected = expected_hessian
    assert actual.shape == (params.size, params.size)
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def test_hessian_is_symmetric_psd(problem):
    params, features, labels = problem
    hessian = head_hessian(params, features, labels, l2=0.0)
    np.testing.assert_allclose(hessian, hessian.T, rtol=0, atol=1e-12)
    assert np.linalg.eigvalsh(hessian).min() > -1e-10


def test_hessian_l2_shifts_spectrum(problem):
    params, features, labels = problem
    plain = head_hessian(params, features, labels, l2=0.0)
    shifted = head_hessian(params, features, labels, l2=0.5)
    np.testing.assert_allclose(shifted - plain, 0.5 * np.eye(params.size), rtol=0, atol=1e-12)


def test_hessian_rejects_wrong_dim(problem):
    params, features, labels = problem
    with pytest.raises(ValueError, match="expected features with d="):
        head_hessian(params, [x[:, :2] for x in features], labels, l2=0.1)


def test_factor_and_solve(problem):
    params, features, labels = problem
    hessian = head_hessian(params, features, labels, l2=0.1)
    factor = factor_hessian(hessian, damping=0.01)
    np.testing.assert_allclose(factor @ factor.T, hessian + 0.01 * np.eye(params.size), rtol=1e-10, atol=1e-12)
    assert np.allclose(factor, np.tril(factor))
    vector = np.random.default_rng(0).normal(size=params.size)
    np.testing.assert_allclose(solve(factor, (hessian + 0.01 * np.eye(params.size)) @ vector), vector, rtol=1e-7, atol=1e-9)
    query = solve_params(factor, HeadParams.unflatten(vector, NUM_TAGS, DIM))
    np.testing.assert_allclose(query.flatten(), solve(factor, vector), rtol=1e-12, atol=1e-14)


def test_factor_rejects_indefinite():
    with pytest.raises(ValueError, match="positive definite"):
        factor_hessian(np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="expected a square Hessian"):
        factor_hessian(np.zeros((2, 3)))
