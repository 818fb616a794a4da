"""Influence kernels against brute force: paths are enumerated and gradients come from autograd."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segflu_core import crf
from segflu_core.influence.head import HeadParams, head_objective, segment_losses
from segflu_core.influence.hessian import factor_hessian, head_hessian, solve_params
from segflu_core.influence.scores import (
    grouped_scores,
    item_gradient,
    item_gradients,
    neighbour_labels,
    segment_gradient,
    word_scores,
)

NUM_TAGS = 3
DIM = 5


def random_params(rng: np.random.Generator, num_tags: int = NUM_TAGS, dim: int = DIM) -> HeadParams:
    return HeadParams(
        rng.normal(size=(num_tags, dim)),
        rng.normal(size=num_tags),
        rng.normal(size=(num_tags, num_tags)),
        rng.normal(size=num_tags),
        rng.normal(size=num_tags),
    )


def random_sentences(rng: np.random.Generator, lengths, num_tags: int = NUM_TAGS, dim: int = DIM):
    features = [rng.normal(size=(n, dim)) for n in lengths]
    labels = [rng.integers(0, num_tags, size=n) for n in lengths]
    return features, labels


def brute_path_score(emissions, transitions, start, end, path) -> torch.Tensor:
    """Score of one tag sequence, written out term by term."""
    total = start[path[0]] + end[path[-1]]
    for t, tag in enumerate(path):
        total = total + emissions[t, tag]
        if t > 0:
            total = total + transitions[path[t - 1], tag]
    return total


def brute_conditional_loss(tensors, features, labels, seg_start: int, seg_end: int) -> torch.Tensor:
    """−log p(y[seg_start:seg_end] | other gold tags) by enumerating every path of the segment.

    ``tensors`` is ``(W, b, A, π, ω)``, or ``(emissions, A, π, ω)`` when the
    emissions themselves are the variable.
    """
    if len(tensors) == 5:
        weight, bias, transitions, start, end = tensors
        emissions = torch.as_tensor(features, dtype=torch.float64) @ weight.T + bias
    else:
        emissions, transitions, start, end = tensors
    num_tags = transitions.shape[0]
    labels = [int(v) for v in labels]
    scores = []
    for inner in itertools.product(range(num_tags), repeat=seg_end - seg_start):
        path = labels[:seg_start] + list(inner) + labels[seg_end:]
        scores.append(brute_path_score(emissions, transitions, start, end, path))
    gold = brute_path_score(emissions, transitions, start, end, labels)
    return torch.logsumexp(torch.stack(scores), dim=0) - gold


def brute_gradient(params: HeadParams, features, labels, seg_start: int, seg_end: int) -> HeadParams:
    tensors = params.to_torch(requires_grad=True)
    loss = brute_conditional_loss(tensors, features, labels, seg_start, seg_end)
    return HeadParams.from_torch(torch.autograd.grad(loss, tensors, materialize_grads=True))


def brute_objective(tensors, features, labels, l2: float) -> torch.Tensor:
    """J(θ) = mean instance loss + (λ/2)‖θ‖², by enumeration."""
    losses = [brute_conditional_loss(tensors, x, y, 0, len(y)) for x, y in zip(features, labels)]
    return torch.stack(losses).mean() + 0.5 * l2 * sum((t * t).sum() for t in tensors)


def brute_item_statistics(params: HeadParams, features, labels, seg_start: int, seg_end: int):
    """Residuals (n, C) and explicit G_A, G_π, G_ω of a segment, all from autograd of the brute loss."""
    weight, bias, transitions, start, end = params.to_torch()
    emissions = (torch.as_tensor(features) @ weight.T + bias).requires_grad_(True)
    explicit = [t.clone().requires_grad_(True) for t in (transitions, start, end)]
    loss = brute_conditional_loss([emissions, *explicit], features, labels, seg_start, seg_end)
    gradients = torch.autograd.grad(loss, [emissions, *explicit], materialize_grads=True)
    return tuple(g.numpy() for g in gradients)


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    params = random_params(rng)
    features, labels = random_sentences(rng, [1, 3, 5, 2, 4])
    return params, features, labels


def test_flatten_round_trip(problem):
    params, _, _ = problem
    vector = params.flatten()
    assert vector.shape == (params.size,)
    assert params.size == NUM_TAGS * DIM + NUM_TAGS + NUM_TAGS**2 + 2 * NUM_TAGS
    back = HeadParams.unflatten(vector, NUM_TAGS, DIM)
    for name in ("weight", "bias", "transitions", "start", "end"):
        np.testing.assert_array_equal(getattr(back, name), getattr(params, name))
    # W comes first, row-major, then b, A row-major, π, ω
    np.testing.assert_array_equal(vector[:DIM], params.weight[0])
    np.testing.assert_array_equal(vector[NUM_TAGS * DIM : NUM_TAGS * DIM + NUM_TAGS], params.bias)
    np.testing.assert_array_equal(vector[-NUM_TAGS:], params.end)


def test_unflatten_rejects_wrong_size():
    with pytest.raises(ValueError, match="expected a vector of shape"):
        HeadParams.unflatten(np.zeros(7), NUM_TAGS, DIM)


def test_tagger_round_trip(problem):
    params, _, _ = problem
    tagger = SimpleNamespace(emission=torch.nn.Linear(DIM, NUM_TAGS), crf=crf.CRF(NUM_TAGS))
    params.to_tagger(tagger)
    assert tagger.emission.weight.dtype == torch.float32
    back = HeadParams.from_tagger(tagger)
    np.testing.assert_allclose(back.flatten(), params.flatten(), rtol=1e-6, atol=1e-6)


def test_segment_losses_match_enumeration(problem):
    params, features, labels = problem
    segments = [(0, 0, 1), (1, 1, 3), (2, 0, 5), (2, 4, 5), (3, 0, 2), (4, 2, 3)]
    expected = [
        float(brute_conditional_loss(params.to_torch(), features[s], labels[s], a, b)) for s, a, b in segments
    ]
    np.testing.assert_allclose(segment_losses(params, features, labels, segments), expected, rtol=1e-12, atol=1e-12)


def test_head_objective_matches_enumeration(problem):
    params, features, labels = problem
    value, gradient = head_objective(params, features, labels, l2=0.3)
    tensors = params.to_torch(requires_grad=True)
    expected = brute_objective(tensors, features, labels, 0.3)
    expected_gradient = torch.autograd.grad(expected, tensors)
    assert value == pytest.approx(float(expected.detach()), rel=1e-12)
    expected_gradient = np.concatenate([g.numpy().ravel() for g in expected_gradient])
    np.testing.assert_allclose(gradient.flatten(), expected_gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("segment", [(0, 0, 1), (1, 0, 3), (1, 1, 2), (2, 1, 4), (2, 0, 5), (2, 4, 5), (3, 1, 2)])
def test_segment_gradient_matches_autograd(problem, segment):
    params, features, labels = problem
    s, a, b = segment
    expected = brute_gradient(params, features[s], labels[s], a, b)
    actual = segment_gradient(features[s], labels[s], params, a, b)
    np.testing.assert_allclose(actual.flatten(), expected.flatten(), rtol=1e-10, atol=1e-12)


def test_segment_gradient_rejects_empty_segment(problem):
    params, features, labels = problem
    with pytest.raises(ValueError, match="expected 0 <= start < end"):
        segment_gradient(features[1], labels[1], params, 2, 2)


def word_table(params: HeadParams, features, labels):
    """Residuals and brute gradients of every training word, in sentence order."""
    residuals, gradients = [], []
    for x, y in zip(features, labels):
        for t in range(len(y)):
            word_residuals, _, _, _ = brute_item_statistics(params, x, y, t, t + 1)
            residuals.append(word_residuals[t])
            gradients.append(brute_gradient(params, x, y, t, t + 1).flatten())
    return np.stack(residuals), np.stack(gradients)


def queries(params: HeadParams, features, labels):
    """Q = g_test and Q = H⁻¹ g_test for a test segment of the first sentence of a fresh draw."""
    rng = np.random.default_rng(11)
    test_features, test_labels = random_sentences(rng, [4])
    g_test = segment_gradient(test_features[0], test_labels[0], params, 1, 3)
    factor = factor_hessian(head_hessian(params, features, labels, l2=0.1))
    return {"gradient": g_test, "inverse_hessian": solve_params(factor, g_test)}


@pytest.mark.parametrize("query_kind", ["gradient", "inverse_hessian"])
def test_word_scores_match_dot_products(problem, query_kind):
    params, features, labels = problem
    query = queries(params, features, labels)[query_kind]
    residuals, gradients = word_table(params, features, labels)
    prev_labels, next_labels = neighbour_labels(labels)
    scores = word_scores(query, np.concatenate(features), residuals, prev_labels, next_labels)
    np.testing.assert_allclose(scores, -(gradients @ query.flatten()), rtol=1e-9, atol=1e-12)


def test_word_scores_chunk_size_and_float16(problem):
    params, features, labels = problem
    query = queries(params, features, labels)["gradient"]
    residuals, _ = word_table(params, features, labels)
    prev_labels, next_labels = neighbour_labels(labels)
    flat = np.concatenate(features)
    whole = word_scores(query, flat.astype(np.float32), residuals, prev_labels, next_labels)
    for chunk_size in (1, 4, 7):
        chunked = word_scores(query, flat.astype(np.float32), residuals, prev_labels, next_labels, chunk_size=chunk_size)
        np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)
    half = word_scores(query, flat.astype(np.float16), residuals, prev_labels, next_labels, chunk_size=3)
    np.testing.assert_allclose(half, whole, rtol=1e-2, atol=1e-2 * np.abs(whole).max())


def group_table(params: HeadParams, features, labels, items):
    """Per-word residuals, group ids and explicit gradients of items, all by brute force."""
    offsets = np.concatenate([[0], np.cumsum([len(y) for y in labels])])
    residuals = np.zeros((offsets[-1], NUM_TAGS))
    group_ids = np.full(offsets[-1], -1)
    explicit = {"transitions": [], "start": [], "end": []}
    gradients = []
    for g, (s, a, b) in enumerate(items):
        item_residuals, g_transitions, g_start, g_end = brute_item_statistics(params, features[s], labels[s], a, b)
        residuals[offsets[s] + a : offsets[s] + b] = item_residuals[a:b]
        group_ids[offsets[s] + a : offsets[s] + b] = g
        explicit["transitions"].append(g_transitions)
        explicit["start"].append(g_start)
        explicit["end"].append(g_end)
        gradients.append(brute_gradient(params, features[s], labels[s], a, b).flatten())
    return residuals, group_ids, {k: np.stack(v) for k, v in explicit.items()}, np.stack(gradients)


# Spans are disjoint so each word belongs to at most one item, as in one index array.
SPAN_ITEMS = [(0, 0, 1), (1, 1, 3), (2, 0, 2), (2, 3, 5), (4, 0, 4)]
SENTENCE_ITEMS = [(0, 0, 1), (1, 0, 3), (2, 0, 5), (4, 0, 4)]


@pytest.mark.parametrize("items", [SPAN_ITEMS, SENTENCE_ITEMS], ids=["spans", "sentences"])
@pytest.mark.parametrize("query_kind", ["gradient", "inverse_hessian"])
def test_grouped_scores_match_dot_products(problem, items, query_kind):
    params, features, labels = problem
    query = queries(params, features, labels)[query_kind]
    residuals, group_ids, explicit, gradients = group_table(params, features, labels, items)
    flat = np.concatenate(features)
    scores = grouped_scores(query, flat, residuals, group_ids, explicit["transitions"], explicit["start"], explicit["end"])
    np.testing.assert_allclose(scores, -(gradients @ query.flatten()), rtol=1e-9, atol=1e-12)
    chunked = grouped_scores(
        query, flat, residuals, group_ids, explicit["transitions"], explicit["start"], explicit["end"], chunk_size=2
    )
    np.testing.assert_allclose(chunked, scores, rtol=1e-12, atol=1e-12)


def test_grouped_scores_rejects_bad_group_ids(problem):
    params, features, labels = problem
    flat = np.concatenate(features)
    zeros = np.zeros((2, NUM_TAGS))
    with pytest.raises(ValueError, match="expected group_ids"):
        grouped_scores(params, flat, np.zeros((len(flat), NUM_TAGS)), np.full(len(flat), 5), np.zeros((2, NUM_TAGS, NUM_TAGS)), zeros, zeros)


def padded_batch(features, labels, params: HeadParams):
    max_len = max(len(y) for y in labels)
    emissions = torch.zeros(len(labels), max_len, NUM_TAGS, dtype=torch.float64)
    tags = torch.zeros(len(labels), max_len, dtype=torch.long)
    mask = torch.zeros(len(labels), max_len, dtype=torch.bool)
    weight, bias, _, _, _ = params.to_torch()
    for i, (x, y) in enumerate(zip(features, labels)):
        emissions[i, : len(y)] = torch.as_tensor(x) @ weight.T + bias
        tags[i, : len(y)] = torch.as_tensor(y)
        mask[i, : len(y)] = True
    return emissions, tags, mask


def test_item_gradients_from_segment_conditional(problem):
    params, features, labels = problem
    items = [(1, 1, 3), (2, 0, 2), (2, 3, 5), (3, 0, 2), (4, 2, 3), (0, 0, 1)]
    emissions, tags, mask = padded_batch([features[s] for s, _, _ in items], [labels[s] for s, _, _ in items], params)
    _, _, transitions, start, end = params.to_torch()
    seg_start = torch.tensor([a for _, a, _ in items])
    seg_end = torch.tensor([b for _, _, b in items])
    conditional = crf.segment_conditional(emissions, tags, mask, transitions, start, end, seg_start, seg_end)
    g_transitions, g_start, g_end = item_gradients(conditional.residuals, tags, mask, conditional.pairwise, seg_start, seg_end)
    for row, (s, a, b) in enumerate(items):
        _, expected_transitions, expected_start, expected_end = brute_item_statistics(params, features[s], labels[s], a, b)
        np.testing.assert_allclose(g_transitions[row], expected_transitions, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g_start[row], expected_start, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g_end[row], expected_end, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("position", [0, 2, 4])
def test_item_gradient_of_word_without_pairwise(problem, position):
    params, features, labels = problem
    x, y = features[2], labels[2]
    residuals, expected_transitions, expected_start, expected_end = brute_item_statistics(params, x, y, position, position + 1)
    g_transitions, g_start, g_end = item_gradient(residuals, y, None, position, position + 1)
    np.testing.assert_allclose(g_transitions, expected_transitions, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g_start, expected_start, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g_end, expected_end, rtol=1e-9, atol=1e-12)


def test_item_gradient_needs_pairwise_for_spans(problem):
    params, features, labels = problem
    residuals, _, _, _ = brute_item_statistics(params, features[2], labels[2], 1, 3)
    with pytest.raises(ValueError, match="expected pairwise marginals"):
        item_gradient(residuals, labels[2], None, 1, 3)


def test_word_scores_rejects_bad_labels(problem):
    params, features, labels = problem
    flat = np.concatenate(features)
    residuals = np.zeros((len(flat), NUM_TAGS))
    prev_labels, next_labels = neighbour_labels(labels)
    with pytest.raises(ValueError, match="expected prev_labels in"):
        word_scores(params, flat, residuals, prev_labels + NUM_TAGS, next_labels)
    with pytest.raises(ValueError, match="expected next_labels of shape"):
        word_scores(params, flat, residuals, prev_labels, next_labels[:-1])


def test_neighbour_labels_marks_sentence_edges():
    prev_labels, next_labels = neighbour_labels([np.array([2]), np.array([0, 1, 2])])
    np.testing.assert_array_equal(prev_labels, [-1, -1, 0, 1])
    np.testing.assert_array_equal(next_labels, [-1, 1, 2, -1])


def test_segment_losses_match_crf_module(problem):
    params, features, labels = problem
    items = [(1, 1, 3), (2, 0, 5), (2, 3, 5), (4, 2, 3), (0, 0, 1)]
    emissions, tags, mask = padded_batch([features[s] for s, _, _ in items], [labels[s] for s, _, _ in items], params)
    _, _, transitions, start, end = params.to_torch()
    seg_start = torch.tensor([a for _, a, _ in items])
    seg_end = torch.tensor([b for _, _, b in items])
    conditional = crf.segment_conditional(emissions, tags, mask, transitions, start, end, seg_start, seg_end)
    expected = -conditional.log_likelihood.numpy()
    np.testing.assert_allclose(segment_losses(params, features, labels, items), expected, rtol=1e-10, atol=1e-12)
