"""Closed-form influence of training words, spans and sentences on a test segment.

The influence of a training item on a test segment is
``I = −g_testᵀ H⁻¹ g_train``, with ``g = ∇θ CL`` the gradient of the
conditional loss. A query ``Q`` (``g_test``, or ``H⁻¹ g_test``) is a
:class:`HeadParams`. A training word ``u`` with residuals ``r_u``, features
``h_u``, previous gold tag ``p_u`` and next gold tag ``q_u`` has the rank-one
gradient, so

    I_u = −( r_uᵀ Q_W h_u + Q_b·r_u + Q_A[p_u, :]·r_u + Q_A[:, q_u]·r_u
             + [u first] Q_π·r_u + [u last] Q_ω·r_u ),

and scoring every training word is one ``(N_tok, d) × (d, C)`` product and
row-wise dot products. Spans and sentences sum the per-word emission terms of
their words and add their explicit transition, start and end gradients.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from segflu_core.influence.head import HeadParams, PackedSentences, check_segment, sentence_losses


def segment_gradient(features, labels, params: HeadParams, seg_start: int, seg_end: int) -> HeadParams:
    """Compute ``g = ∇θ CL`` of the segment ``[seg_start, seg_end)`` given the gold tags outside it.

    Parameters
    ----------
    features : np.ndarray
        Word features of one sentence, shape ``(n, d)``.
    labels : np.ndarray
        Gold tags, shape ``(n,)``, int.
    params : HeadParams
        The head ``θ``.
    seg_start, seg_end : int
        The segment; ``[0, n)`` gives the gradient of the instance loss.

    Returns
    -------
    HeadParams
        The gradient, float64.
    """
    check_segment((0, seg_start, seg_end), [features])
    packed = PackedSentences([features], [labels], params.num_tags, allowed=[(seg_start, seg_end)])
    tensors = params.to_torch(requires_grad=True)
    loss = sentence_losses(tensors, packed).sum()
    return HeadParams.from_torch(torch.autograd.grad(loss, tensors, materialize_grads=True))


def _check_query_rows(query: HeadParams, features, residuals, num_rows: int) -> None:
    if np.ndim(features) != 2 or features.shape[1] != query.dim:
        raise ValueError(f"expected features of shape (N, {query.dim}), got shape {np.shape(features)}")
    if features.shape[0] != num_rows:
        raise ValueError(f"expected {num_rows} feature rows, got {features.shape[0]}")
    if np.shape(residuals) != (num_rows, query.num_tags):
        raise ValueError(f"expected residuals of shape ({num_rows}, {query.num_tags}), got shape {np.shape(residuals)}")


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"expected chunk_size >= 1, got {chunk_size}")


def _emission_terms(query: HeadParams, features, residuals, start: int, stop: int) -> np.ndarray:
    """Return ``r_uᵀ Q_W h_u + Q_b·r_u`` for rows ``[start, stop)``, shape ``(stop − start,)``."""
    # shape: (m, d); float16 memory-mapped rows become float64 here, one chunk at a time
    chunk = np.asarray(features[start:stop], dtype=np.float64)
    # shape: (m, C)
    projected = chunk @ query.weight.T + query.bias
    return np.einsum("mc,mc->m", projected, np.asarray(residuals[start:stop], dtype=np.float64))


def word_scores(query: HeadParams, features, residuals, prev_labels, next_labels, *, chunk_size: int = 65536) -> np.ndarray:
    """Compute the influence ``I_u`` of every training word on the query's test segment.

    Parameters
    ----------
    query : HeadParams
        ``Q = g_test`` (ranking without Hessian) or ``Q = H⁻¹ g_test``.
    features : np.ndarray
        Word features, shape ``(N, d)``, float16, float32 or float64; may be memory-mapped.
    residuals : np.ndarray
        Each word's conditional marginals minus its one-hot gold tag, shape ``(N, C)``.
    prev_labels, next_labels : np.ndarray
        Gold tags of the neighbouring words, shape ``(N,)`` int. The value
        ``-1`` marks a sentence's first word (``prev_labels``) or last word
        (``next_labels``). There the start or end transitions take the place of ``Q_A``.
    chunk_size : int
        Rows converted to float64 at a time.

    Returns
    -------
    np.ndarray
        ``I_u``, shape ``(N,)``, float64. Negative values support the test
        segment's gold tags, positive values oppose them.
    """
    num_words = len(prev_labels)
    _check_query_rows(query, features, residuals, num_words)
    _check_chunk_size(chunk_size)
    prev_labels = np.asarray(prev_labels, dtype=np.int64)
    next_labels = np.asarray(next_labels, dtype=np.int64)
    for name, values in (("prev_labels", prev_labels), ("next_labels", next_labels)):
        if values.shape != (num_words,):
            raise ValueError(f"expected {name} of shape ({num_words},), got shape {values.shape}")
        if num_words and (values.min() < -1 or values.max() >= query.num_tags):
            raise ValueError(f"expected {name} in [-1, {query.num_tags}), got values from {values.min()} to {values.max()}")

    # shape: (C + 1, C); row p is Q_A[p, :], and index -1 selects Q_π
    entering = np.vstack([query.transitions, query.start])
    # shape: (C + 1, C); row q is Q_A[:, q], and index -1 selects Q_ω
    leaving = np.vstack([query.transitions.T, query.end])
    scores = np.empty(num_words)
    for start in range(0, num_words, chunk_size):
        stop = min(start + chunk_size, num_words)
        rows = np.asarray(residuals[start:stop], dtype=np.float64)
        # shape: (m, C)
        neighbours = entering[prev_labels[start:stop]] + leaving[next_labels[start:stop]]
        transition_terms = np.einsum("mc,mc->m", neighbours, rows)
        scores[start:stop] = -(_emission_terms(query, features, residuals, start, stop) + transition_terms)
    return scores


def grouped_scores(
    query: HeadParams,
    features,
    residuals,
    group_ids,
    group_transitions,
    group_start,
    group_end,
    *,
    chunk_size: int = 65536,
) -> np.ndarray:
    """Compute the influence ``I_g`` of training spans or sentences on the query's test segment.

    Parameters
    ----------
    query : HeadParams
        ``Q = g_test`` or ``Q = H⁻¹ g_test``.
    features : np.ndarray
        Word features, shape ``(N, d)``, any float dtype; may be memory-mapped.
    residuals : np.ndarray
        Residuals of each word under its item's conditional, shape ``(N, C)``.
    group_ids : np.ndarray
        Item of each word, shape ``(N,)`` int in ``[-1, G)``; ``-1`` means the
        word belongs to no item.
    group_transitions, group_start, group_end : np.ndarray
        Each item's explicit gradients ``G_A`` ``(G, C, C)``, ``G_π`` ``(G, C)``
        and ``G_ω`` ``(G, C)``, as built by :func:`item_gradients`.
    chunk_size : int
        Rows converted to float64 at a time.

    Returns
    -------
    np.ndarray
        ``I_g``, shape ``(G,)``, float64.
    """
    group_ids = np.asarray(group_ids, dtype=np.int64)
    num_words = len(group_ids)
    _check_query_rows(query, features, residuals, num_words)
    _check_chunk_size(chunk_size)
    num_tags = query.num_tags
    group_transitions = np.asarray(group_transitions, dtype=np.float64)
    num_groups = group_transitions.shape[0] if group_transitions.ndim == 3 else -1
    if group_transitions.shape != (num_groups, num_tags, num_tags):
        raise ValueError(f"expected group_transitions of shape (G, {num_tags}, {num_tags}), got shape {group_transitions.shape}")
    for name, values in (("group_start", group_start), ("group_end", group_end)):
        if np.shape(values) != (num_groups, num_tags):
            raise ValueError(f"expected {name} of shape ({num_groups}, {num_tags}), got shape {np.shape(values)}")
    if num_words and (group_ids.min() < -1 or group_ids.max() >= num_groups):
        raise ValueError(f"expected group_ids in [-1, {num_groups}), got values from {group_ids.min()} to {group_ids.max()}")

    totals = np.zeros(num_groups)
    for start in range(0, num_words, chunk_size):
        stop = min(start + chunk_size, num_words)
        ids = group_ids[start:stop]
        member = ids >= 0
        terms = _emission_terms(query, features, residuals, start, stop)
        totals += np.bincount(ids[member], weights=terms[member], minlength=num_groups)
    totals += np.einsum("gij,ij->g", group_transitions, query.transitions)
    totals += np.asarray(group_start, dtype=np.float64) @ query.start
    totals += np.asarray(group_end, dtype=np.float64) @ query.end
    return -totals


def item_gradients(residuals, tags, mask, pairwise, seg_start, seg_end) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build the explicit transition, start and end gradients of segments from their conditionals.

    Parameters
    ----------
    residuals : np.ndarray or torch.Tensor
        ``(B, T, C)`` residuals of each segment, zero outside it, as returned by
        ``segflu_core.crf.segment_conditional``.
    tags : np.ndarray or torch.Tensor
        ``(B, T)`` gold tags, int.
    mask : np.ndarray or torch.Tensor
        ``(B, T)`` bool, a left-aligned prefix of ones.
    pairwise : np.ndarray or torch.Tensor or None
        ``(B, T − 1, C, C)`` expected transition counts on the edges touching
        each segment. May be None only when every segment is one word, whose
        pairwise marginals follow from its residuals.
    seg_start, seg_end : sequence of int
        ``(B,)`` half-open segments ``[seg_start, seg_end)``.

    Returns
    -------
    tuple of np.ndarray
        ``G_A`` ``(B, C, C)``, ``G_π`` ``(B, C)``, ``G_ω`` ``(B, C)``, float64:
        the gradients of each segment's conditional loss with respect to the
        transitions, start transitions and end transitions.
    """
    residuals = _to_numpy(residuals, np.float64)
    tags = _to_numpy(tags, np.int64)
    lengths = _to_numpy(mask, bool).sum(axis=1)
    seg_start = np.asarray(seg_start, dtype=np.int64)
    seg_end = np.asarray(seg_end, dtype=np.int64)
    batch, seq_len, num_tags = residuals.shape
    if tags.shape != (batch, seq_len) or seg_start.shape != (batch,) or seg_end.shape != (batch,):
        raise ValueError(f"expected tags ({batch}, {seq_len}) and segments ({batch},), got {tags.shape}, {seg_start.shape}, {seg_end.shape}")
    if pairwise is None:
        if np.any(seg_end - seg_start != 1):
            raise ValueError("expected pairwise marginals for segments longer than one word, got None")
        pairwise = _word_pairwise(residuals, tags, lengths, seg_start)
    pairwise = _to_numpy(pairwise, np.float64)

    rows = np.arange(batch)
    one_hot = np.eye(num_tags)[tags]
    # shape: (B, T − 1, C, C) observed one-hot tag pairs on each edge (t, t + 1)
    observed = one_hot[:, :-1, :, None] * one_hot[:, 1:, None, :]
    edges = np.arange(seq_len - 1)[None, :]
    # edge (t, t + 1) touches [a, b) when t + 1 >= a and t < b, and exists when t + 1 < length
    touching = (edges + 1 >= seg_start[:, None]) & (edges < seg_end[:, None]) & (edges + 1 < lengths[:, None])
    transitions = np.einsum("be,beij->bij", touching.astype(np.float64), pairwise - observed)
    start = residuals[:, 0] * (seg_start == 0)[:, None]
    end = residuals[rows, lengths - 1] * (seg_end == lengths)[:, None]
    return transitions, start, end


def _word_pairwise(residuals, tags, lengths, positions) -> np.ndarray:
    """Pairwise marginals of the two edges around each single-word segment, shape ``(B, T − 1, C, C)``."""
    batch, seq_len, num_tags = residuals.shape
    rows = np.arange(batch)
    one_hot = np.eye(num_tags)
    # shape: (B, C); the word's conditional marginal is its residual plus its one-hot tag
    marginal = residuals[rows, positions] + one_hot[tags[rows, positions]]
    pairwise = np.zeros((batch, max(seq_len - 1, 0), num_tags, num_tags))
    for row, (position, length) in enumerate(zip(positions, lengths)):
        if position > 0:
            pairwise[row, position - 1] = np.outer(one_hot[tags[row, position - 1]], marginal[row])
        if position + 1 < length:
            pairwise[row, position] = np.outer(marginal[row], one_hot[tags[row, position + 1]])
    return pairwise


def item_gradient(residuals, labels, pairwise, seg_start: int, seg_end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build ``G_A``, ``G_π`` and ``G_ω`` of one segment of one sentence.

    ``residuals`` has shape ``(n, C)``, ``labels`` ``(n,)`` and ``pairwise``
    ``(n − 1, C, C)`` or None for a one-word segment; see :func:`item_gradients`.
    """
    residuals = _to_numpy(residuals, np.float64)
    labels = _to_numpy(labels, np.int64)
    mask = np.ones(labels.shape, dtype=bool)
    batched_pairwise = None if pairwise is None else _to_numpy(pairwise, np.float64)[None]
    transitions, start, end = item_gradients(residuals[None], labels[None], mask[None], batched_pairwise, [seg_start], [seg_end])
    return transitions[0], start[0], end[0]


def _to_numpy(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def neighbour_labels(labels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return ``prev_labels`` and ``next_labels`` for :func:`word_scores`, each of shape ``(N_tok,)``.

    ``labels[i]`` has shape ``(n_i,)``; the sentences are concatenated in order
    and ``-1`` marks a missing neighbour.
    """
    previous, following = [], []
    for sentence in labels:
        sentence = np.asarray(sentence, dtype=np.int64)
        previous.append(np.concatenate([[-1], sentence[:-1]]))
        following.append(np.concatenate([sentence[1:], [-1]]))
    if not previous:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(previous), np.concatenate(following)
