"""Rank training items by their influence on a test segment, or by feature similarity.

A query is a segment ``[start, end)`` of one sentence with word features and
labels (gold or predicted). Influence methods score training words, gold
spans or sentences with the closed-form factorisation of
:mod:`segflu_core.influence.scores` and return the ``top_k`` most supporting
(most negative score) and ``top_k`` most opposing items. Nearest-neighbour
methods return the ``top_k`` training words most similar to the segment's
mean feature.

``method="instance"`` is instance-level influence: the query gradient is the
loss of the whole test sentence and the training items are sentences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.linalg
import torch

from segflu_core import crf
from segflu_core.errors import IndexNotBuiltError
from segflu_core.influence import conflicts, neighbors
from segflu_core.influence.head import HeadParams, check_segment
from segflu_core.influence.index import InfluenceIndex
from segflu_core.influence.scores import item_gradient

logger = logging.getLogger(__name__)

METHODS = ("segment", "instance", "nn-dot", "nn-cosine")
GRANULARITIES = ("word", "span", "sentence")
LABEL_SOURCES = ("gold", "predicted")
COLUMNS = ["sentence", "doc", "start", "end", "tokens", "gold", "score", "role", "conflict"]


@dataclass
class Query:
    """A segment to explain.

    Attributes
    ----------
    features : numpy.ndarray
        float32, shape (n, d): features of the words of the query sentence.
    labels : numpy.ndarray
        int64, shape (n,): the labels the segment is explained under.
    start, end : int
        The segment ``[start, end)``.
    train_sentence : int or None
        The sentence's position in the training split when the query is a
        training sentence, so nearest-neighbour results can leave it out.
    """

    features: np.ndarray
    labels: np.ndarray
    start: int
    end: int
    train_sentence: int | None = None


def check_options(method: str, granularity: str, label_filter: str | None, top_k: int) -> None:
    """Validate the options of :func:`explain_query`."""
    if method not in METHODS:
        raise ValueError(f"expected method in {METHODS}, got {method!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"expected granularity in {GRANULARITIES}, got {granularity!r}")
    if label_filter not in (None, "same", "different"):
        raise ValueError(f"expected label_filter None, 'same' or 'different', got {label_filter!r}")
    ranks_sentences = method == "instance" or (method == "segment" and granularity == "sentence")
    if label_filter is not None and ranks_sentences:
        raise ValueError("expected label_filter None when ranking sentences, got "
                         f"{label_filter!r}; sentences have no single gold label")
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"expected top_k >= 1, got {top_k!r}")


def closed_form_gradient(features: np.ndarray, labels: np.ndarray, head: HeadParams, start: int, end: int) -> HeadParams:
    """Compute ``g = ∇θ CL`` of segment ``[start, end)`` from its constrained marginals.

    Equals :func:`segflu_core.influence.scores.segment_gradient` (autograd)
    but runs one forward-backward pass instead of building a graph, which
    makes it several times faster for a single query.

    Parameters
    ----------
    features : numpy.ndarray
        float, shape (n, d): the sentence's word features.
    labels : numpy.ndarray
        int, shape (n,): the labels the loss is taken under.
    """
    # shape: (1, n, C)
    emissions = torch.from_numpy(np.asarray(features, dtype=np.float64) @ head.weight.T + head.bias)[None]
    tags = torch.from_numpy(np.asarray(labels, dtype=np.int64))[None]
    mask = torch.ones_like(tags, dtype=torch.bool)
    parameters = (torch.from_numpy(head.transitions), torch.from_numpy(head.start), torch.from_numpy(head.end))
    conditional = crf.segment_conditional(emissions, tags, mask, *parameters, torch.tensor([start]), torch.tensor([end]))
    # shape: (n, C)
    residuals = conditional.residuals[0].numpy()
    transitions, start_gradient, end_gradient = item_gradient(residuals, labels, conditional.pairwise[0], start, end)
    weight = residuals.T @ np.asarray(features, dtype=np.float64)
    return HeadParams(weight, residuals.sum(0), transitions, start_gradient, end_gradient)


def query_vector(index: InfluenceIndex, query: Query, *, instance: bool, hessian: bool) -> HeadParams:
    """Return ``Q = g_test`` or ``Q = H⁻¹ g_test`` for the query segment (the whole sentence when ``instance``)."""
    start, end = (0, len(query.labels)) if instance else (query.start, query.end)
    check_segment((0, start, end), [query.features])
    gradient = closed_form_gradient(query.features, query.labels, index.head, start, end)
    if not hessian:
        return gradient
    if not index.has("hessian_factor"):
        raise IndexNotBuiltError(
            f"{index.folder}: the index has no Hessian factor; rebuild it with "
            f"`segflu index {index.folder.parent} --refit-head --hessian`"
        )
    factor = index.cached("hessian_factor", lambda: np.array(index["hessian_factor"]))
    # The stored factor was checked when it was built, so the per-query scan for NaN is skipped.
    solution = scipy.linalg.cho_solve((factor, True), gradient.flatten(), check_finite=False)
    return HeadParams.unflatten(solution, gradient.num_tags, gradient.dim)


def emission_terms(query: HeadParams, features: np.ndarray, residuals: np.ndarray, neighbour_terms: np.ndarray | None = None) -> np.ndarray:
    """Return ``r_uᵀ (Q_W h_u + Q_b + t_u)`` for every word in float32.

    float32 halves the memory traffic of the (N, d) × (d, C) product against
    float64, and that product dominates a query. ``neighbour_terms`` (N, C)
    optionally adds each word's transition part ``t_u``.
    """
    # shape: (N, C)
    projected = features @ query.weight.T.astype(np.float32)
    projected += query.bias.astype(np.float32)
    if neighbour_terms is not None:
        projected += neighbour_terms
    return np.einsum("nc,nc->n", projected, residuals)


def edge_codes(index: InfluenceIndex, granularity: str) -> np.ndarray:
    """Return each training word's row code in the table of :func:`edge_table`, int64 of shape (N,).

    A word's score adds ``r_uᵀ (entering[p] + leaving[n])`` with row code
    ``p·(C + 2) + n``. Code 0 is the start (end) transition at a sentence's
    first (last) word, ``1 + y`` the transition from (to) a neighbour with
    gold label ``y``, and ``C + 1`` no term. Words and one-word spans take
    both neighbours' transitions. Words of sentences and of longer spans take
    only the start and end transitions, because their items' other
    transition gradients are stored explicitly.
    """
    num_tags = len(index.labels)
    previous = np.asarray(index["train_prev_gold"], dtype=np.int64)
    following = np.asarray(index["train_next_gold"], dtype=np.int64)
    enter, leave = previous + 1, following + 1
    if granularity != "word":
        edge_only = np.ones(len(previous), dtype=bool)
        if granularity == "span":
            lengths = np.asarray(index["train_span_end"], dtype=np.int64) - np.asarray(index["train_span_start"])
            edge_only = lengths[np.asarray(index["train_span_ids"])] > 1
        nothing = num_tags + 1
        enter = np.where(edge_only & (previous >= 0), nothing, enter)
        leave = np.where(edge_only & (following >= 0), nothing, leave)
    return enter * (num_tags + 2) + leave


def edge_table(query: HeadParams) -> np.ndarray:
    """Return the transition, start and end part of a word's score for every row code of :func:`edge_codes`.

    Returns
    -------
    numpy.ndarray
        float32, shape ((C + 2)², C).
    """
    zeros = np.zeros((1, query.num_tags))
    entering = np.vstack([query.start, query.transitions, zeros]).astype(np.float32)
    leaving = np.vstack([query.end, query.transitions.T, zeros]).astype(np.float32)
    return (entering[:, None, :] + leaving[None, :, :]).reshape(-1, query.num_tags)


def influence_scores(index: InfluenceIndex, query: HeadParams, granularity: str) -> np.ndarray:
    """Score every training word, span or sentence; negative scores support the query segment.

    Computes the same values as :func:`segflu_core.influence.scores.word_scores`
    and :func:`segflu_core.influence.scores.grouped_scores` in float32.

    Returns
    -------
    numpy.ndarray
        float32, shape (num_items,).
    """
    features = index.features("train")
    codes = index.cached(f"{granularity}_edge_codes", lambda: edge_codes(index, granularity))
    edges = edge_table(query)[codes]
    if granularity == "word":
        return -emission_terms(query, features, index["train_word_residuals"], edges)
    prefix = "span" if granularity == "span" else "sentence"
    group_ids = index["train_span_ids"] if granularity == "span" else index["train_sentence_ids"]
    terms = emission_terms(query, features, index[f"train_{prefix}_residuals"], edges)
    num_groups = index[f"train_{prefix}_loss"].shape[0]
    totals = np.bincount(group_ids, weights=terms, minlength=num_groups)
    stored = index[f"train_{prefix}_transitions"]
    explicit = stored.reshape(stored.shape[0], -1) @ query.transitions.ravel().astype(np.float32)
    if granularity == "span":
        totals[index["train_multiword_spans"]] += explicit
    else:
        totals += explicit
    return -totals.astype(np.float32)


# Words scored per step of top_word_influences.
SCAN_BLOCK = 8192
# Relative slack on the score bound, far above float32 rounding of the scores.
BOUND_SLACK = 1e-3


@dataclass
class ScanOrder:
    """Training words in descending order of ``‖r_u‖·‖h_u‖``, the query-independent factor of the score bound.

    Attributes
    ----------
    words : numpy.ndarray
        int64, shape (N,): word rows in scan order.
    products : numpy.ndarray
        float64, shape (N,): ``‖r_u‖·‖h_u‖`` in scan order, descending.
    residual_tail : numpy.ndarray
        float64, shape (N + 1,): the largest ``‖r_u‖`` at or after each scan position; 0 at position N.
    """

    words: np.ndarray
    products: np.ndarray
    residual_tail: np.ndarray

    @classmethod
    def build(cls, features: np.ndarray, residuals: np.ndarray) -> "ScanOrder":
        residual_norms = np.linalg.norm(np.asarray(residuals, dtype=np.float64), axis=1)
        products = residual_norms * np.linalg.norm(features, axis=1)
        words = np.argsort(-products, kind="stable")
        tail = np.maximum.accumulate(residual_norms[words][::-1])[::-1]
        return cls(words, products[words], np.append(tail, 0.0))


def score_bound_factors(query: HeadParams) -> tuple[float, float]:
    """Return ``σ`` and ``β`` with ``|I_u| ≤ ‖r_u‖ (σ ‖h_u‖ + β)`` for every training word.

    Residuals sum to zero over the labels, so subtracting the label mean from
    each column of ``Q_W`` and from each row of ``Q_b + t`` changes no score.
    ``σ`` is the spectral norm of the centred ``Q_W`` and ``β`` the largest
    norm of a centred ``Q_b + t`` row of :func:`edge_table`.
    """
    weight = query.weight - query.weight.mean(axis=0, keepdims=True)
    sigma = float(np.linalg.norm(weight, 2))
    additive = edge_table(query).astype(np.float64) + query.bias
    additive -= additive.mean(axis=1, keepdims=True)
    return sigma, float(np.linalg.norm(additive, axis=1).max())


def top_word_influences(index: InfluenceIndex, query: HeadParams, top_k: int, keep: np.ndarray | None = None,
                        *, block: int = SCAN_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find the ``top_k`` most supporting and most opposing training words without scoring every word.

    Words are scored in blocks in the order of :class:`ScanOrder`. The scan
    stops once the bound of :func:`score_bound_factors` for every word not yet
    scored is below the ``top_k``-th largest ``|score|`` found on each side,
    so the result equals :func:`select_influential` over
    :func:`influence_scores`. Most training words are predicted with
    confidence and have tiny residuals, so a query usually scores a small
    share of the words.

    Returns
    -------
    tuple of numpy.ndarray
        Word rows sorted by ascending score (int64), their roles, and their
        float32 scores.
    """
    features = index.features("train")
    residuals = index["train_word_residuals"]
    order = index.cached("word_scan_order", lambda: ScanOrder.build(features, residuals))
    codes = index.cached("word_edge_codes", lambda: edge_codes(index, "word"))
    table = edge_table(query)
    weight = query.weight.T.astype(np.float32)
    bias = query.bias.astype(np.float32)
    sigma, beta = score_bound_factors(query)
    scanned_words, scanned_scores = [], []
    stop = 0
    num_words = len(order.words)
    for first in range(0, num_words, block):
        words = order.words[first : first + block]
        if keep is not None:
            words = words[keep[words]]
        projected = features[words] @ weight
        projected += bias
        projected += table[codes[words]]
        scanned_words.append(words)
        scanned_scores.append(-np.einsum("nc,nc->n", projected, residuals[words]))
        stop = first + block
        if stop >= num_words:
            break
        bound = (sigma * order.products[stop] + beta * order.residual_tail[stop]) * (1 + BOUND_SLACK)
        if bound < side_threshold(np.concatenate(scanned_scores), top_k):
            break
    words = np.concatenate(scanned_words)
    scores = np.concatenate(scanned_scores)
    logger.debug("scored %d of %d training words", min(stop, num_words), num_words)
    chosen, roles = select_influential(scores, top_k)
    return words[chosen], roles, scores[chosen]


def side_threshold(scores: np.ndarray, top_k: int) -> float:
    """Return the smaller of the ``top_k``-th largest ``|score|`` among negative and among positive scores.

    Returns 0 while either side has fewer than ``top_k`` scores, so no bound passes below it.
    """
    negative, positive = -scores[scores < 0], scores[scores > 0]
    if len(negative) < top_k or len(positive) < top_k:
        return 0.0
    return float(min(np.partition(negative, -top_k)[-top_k], np.partition(positive, -top_k)[-top_k]))


def select_influential(scores: np.ndarray, top_k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pick the ``top_k`` most negative and ``top_k`` most positive scores.

    Items with a score of exactly zero are neither supporting nor opposing
    and are never returned.

    Returns
    -------
    tuple of numpy.ndarray
        Item indices sorted by ascending score, int64, and their roles,
        ``"supporting"`` or ``"opposing"``.
    """
    candidates = np.arange(len(scores)) if keep is None else np.flatnonzero(keep)
    values = scores[candidates]
    supporting = _extreme(candidates[values < 0], scores, top_k, smallest=True)
    opposing = _extreme(candidates[values > 0], scores, top_k, smallest=False)
    chosen = np.concatenate([supporting, opposing])
    order = np.argsort(scores[chosen], kind="stable")
    roles = np.where(scores[chosen] < 0, "supporting", "opposing")
    return chosen[order], roles[order]


def _extreme(candidates: np.ndarray, scores: np.ndarray, top_k: int, *, smallest: bool) -> np.ndarray:
    if len(candidates) <= top_k:
        return candidates
    keys = scores[candidates] if smallest else -scores[candidates]
    return candidates[np.argpartition(keys, top_k - 1)[:top_k]]


def item_bounds(index: InfluenceIndex, granularity: str, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the training sentence and word bounds ``[start, end)`` of each item, int64 arrays of shape (k,)."""
    if granularity == "word":
        sentence = np.asarray(index["train_sentence_ids"][items], dtype=np.int64)
        start = np.asarray(index["train_positions"][items], dtype=np.int64)
        return sentence, start, start + 1
    if granularity == "span":
        return tuple(np.asarray(index[f"train_span_{name}"][items], dtype=np.int64) for name in ("sentence", "start", "end"))
    offsets = index["train_sentence_offsets"]
    sentence = np.asarray(items, dtype=np.int64)
    return sentence, np.zeros_like(sentence), (offsets[sentence + 1] - offsets[sentence]).astype(np.int64)


def item_types(index: InfluenceIndex, granularity: str, type_of_label: np.ndarray) -> np.ndarray:
    """Return the gold label type index of every training word or span (the type of the span's first word)."""
    gold = np.asarray(index["train_gold"], dtype=np.int64)
    if granularity == "span":
        first_word = index["train_sentence_offsets"][index["train_span_sentence"]] + index["train_span_start"]
        gold = gold[first_word]
    return type_of_label[gold]


def conflict_units(index: InfluenceIndex, sentences, bounds, granularity: str, type_of_label: np.ndarray) -> conflicts.ConflictUnits:
    """Describe returned items by their words: one unit per word or span, one per word of a sentence."""
    offsets = index["train_sentence_offsets"]
    features = index.features("train")
    gold = index["train_gold"]
    item_ids, forms, unit_features, types = [], [], [], []
    for item, (sentence, start, end) in enumerate(zip(*bounds)):
        first = offsets[sentence]
        tokens = sentences[sentence].tokens
        if granularity == "sentence":
            positions = range(start, end)
            parts = [(tokens[t].lower(), features[first + t], gold[first + t]) for t in positions]
        else:
            text = " ".join(tokens[start:end]).lower()
            parts = [(text, features[first + start : first + end].mean(axis=0), gold[first + start])]
        for form, feature, label in parts:
            item_ids.append(item)
            forms.append(form)
            unit_features.append(feature)
            types.append(type_of_label[label])
    dim = features.shape[1]
    return conflicts.ConflictUnits(
        np.array(item_ids, dtype=np.int64),
        forms,
        np.array(unit_features, dtype=np.float32).reshape(-1, dim),
        np.array(types, dtype=np.int64),
    )


def rows_frame(sentences, bounds, scores: np.ndarray, roles, conflict: np.ndarray) -> pd.DataFrame:
    """Build the result table with the columns of :data:`COLUMNS`."""
    records = []
    for (sentence, start, end), score, role, flag in zip(zip(*bounds), scores, roles, conflict):
        item = sentences[sentence]
        records.append({
            "sentence": int(sentence),
            "doc": int(item.doc),
            "start": int(start),
            "end": int(end),
            "tokens": " ".join(item.tokens[start:end]),
            "gold": " ".join(item.tags[start:end]),
            "score": float(score),
            "role": str(role),
            "conflict": bool(flag),
        })
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def nearest_items(index: InfluenceIndex, query: Query, *, metric: str, keep, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``top_k`` nearest training words to the segment's mean feature and their similarities."""
    segment_mean = query.features[query.start : query.end].mean(axis=0)
    norms = None
    if metric == "cosine":
        norms = index.cached("train_feature_norms", lambda: np.linalg.norm(index.features("train"), axis=1))
    similarities = neighbors.segment_similarities(segment_mean, index.features("train"), metric=metric, feature_norms=norms)
    exclude = None
    if query.train_sentence is not None:
        first = int(index["train_sentence_offsets"][query.train_sentence])
        exclude = np.arange(first + query.start, first + query.end)
    items = neighbors.top_neighbours(similarities, top_k=top_k, keep=keep, exclude=exclude)
    return items, similarities[items]


def explain_query(
    index: InfluenceIndex,
    sentences,
    query: Query,
    *,
    method: str = "segment",
    granularity: str = "word",
    hessian: bool = False,
    label_filter: str | None = None,
    top_k: int = 20,
) -> pd.DataFrame:
    """Rank training items for a query segment; see :meth:`segflu_core.project.Project.explain`.

    ``sentences`` are the training sentences (with ``tokens``, ``tags`` and
    ``doc``) in the order the index stores them.
    """
    check_options(method, granularity, label_filter, top_k)
    if method == "instance":
        granularity = "sentence"
    if method.startswith("nn-"):
        granularity = "word"
    type_of_label = neighbors.type_ids(index.labels)
    keep = None
    if label_filter is not None:
        query_type = int(type_of_label[query.labels[query.start]])
        types = index.cached(f"{granularity}_types", lambda: item_types(index, granularity, type_of_label))
        keep = neighbors.candidate_mask(types, query_type, label_filter)

    if method.startswith("nn-"):
        items, scores = nearest_items(index, query, metric=method[3:], keep=keep, top_k=top_k)
        roles = np.full(len(items), "neighbour")
        sides = np.zeros(len(items), dtype=np.int64)
    else:
        vector = query_vector(index, query, instance=method == "instance", hessian=hessian)
        if granularity == "word":
            items, roles, scores = top_word_influences(index, vector, top_k, keep)
        else:
            all_scores = influence_scores(index, vector, granularity)
            items, roles = select_influential(all_scores, top_k, keep)
            scores = all_scores[items]
        sides = np.where(roles == "supporting", -1, 1)
    bounds = item_bounds(index, granularity, items)
    units = conflict_units(index, sentences, bounds, granularity, type_of_label)
    return rows_frame(sentences, bounds, scores, roles, conflicts.flag_conflicts(units, sides))
