"""Nearest training words of a segment in feature space.

A segment is represented by the mean feature of its words. Training words are
scored by dot product or cosine similarity with that mean and the ``top_k``
best are returned, optionally restricted by gold label type.
"""

from __future__ import annotations

import numpy as np

from segflu_core.schemes import split_tag

METRICS = ("dot", "cosine")


def label_types(labels: list[str]) -> list[str]:
    """Return the entity type of each IOB2 label: ``"B-PER"`` and ``"I-PER"`` give ``"PER"``, ``"O"`` stays ``"O"``."""
    return [split_tag(label)[1] or label for label in labels]


def type_ids(labels: list[str]) -> np.ndarray:
    """Map each label index to an index of its entity type.

    Returns
    -------
    numpy.ndarray
        int64, shape (num_labels,): equal values for labels of one type.
    """
    types = label_types(labels)
    order = {name: i for i, name in enumerate(dict.fromkeys(types))}
    return np.array([order[name] for name in types], dtype=np.int64)


def candidate_mask(gold_types: np.ndarray, query_type: int, label_filter: str | None) -> np.ndarray | None:
    """Select items by gold label type relative to the query's type.

    Parameters
    ----------
    gold_types : numpy.ndarray
        int, shape (num_items,): entity type index of each item.
    query_type : int
        Entity type index of the query segment.
    label_filter : {None, "same", "different"}
        ``None`` keeps every item.

    Returns
    -------
    numpy.ndarray or None
        bool, shape (num_items,), or ``None`` when every item is kept.
    """
    if label_filter is None:
        return None
    if label_filter == "same":
        return gold_types == query_type
    if label_filter == "different":
        return gold_types != query_type
    raise ValueError(f"expected label_filter None, 'same' or 'different', got {label_filter!r}")


def segment_similarities(
    query: np.ndarray,
    features: np.ndarray,
    *,
    metric: str = "dot",
    feature_norms: np.ndarray | None = None,
) -> np.ndarray:
    """Score every training word against a query feature.

    Parameters
    ----------
    query : numpy.ndarray
        float, shape (d,): mean feature of the query segment.
    features : numpy.ndarray
        float32, shape (num_words, d): training word features.
    metric : {"dot", "cosine"}
    feature_norms : numpy.ndarray, optional
        float32, shape (num_words,): precomputed Euclidean norms of ``features``.

    Returns
    -------
    numpy.ndarray
        float32, shape (num_words,): similarity of each training word.
    """
    if metric not in METRICS:
        raise ValueError(f"expected metric 'dot' or 'cosine', got {metric!r}")
    query = np.asarray(query, dtype=np.float32)
    # shape: (num_words,)
    similarities = features @ query
    if metric == "cosine":
        if feature_norms is None:
            feature_norms = np.linalg.norm(features, axis=1)
        denominator = np.maximum(feature_norms * np.linalg.norm(query), np.finfo(np.float32).tiny)
        similarities = similarities / denominator
    return similarities.astype(np.float32, copy=False)


def top_neighbours(
    similarities: np.ndarray,
    *,
    top_k: int,
    keep: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Return the indices of the ``top_k`` most similar items, most similar first.

    Parameters
    ----------
    similarities : numpy.ndarray
        float, shape (num_items,).
    top_k : int
        Number of items to return (fewer when fewer items are eligible).
    keep : numpy.ndarray, optional
        bool, shape (num_items,): eligible items; ``None`` makes all eligible.
    exclude : numpy.ndarray, optional
        int, indices that are never returned, such as the query's own words.

    Returns
    -------
    numpy.ndarray
        int64, shape (<= top_k,): item indices sorted by descending similarity.
    """
    if top_k < 1:
        raise ValueError(f"expected top_k >= 1, got {top_k}")
    eligible = np.ones(len(similarities), dtype=bool) if keep is None else keep.copy()
    if exclude is not None and len(exclude):
        eligible[np.asarray(exclude, dtype=np.int64)] = False
    candidates = np.flatnonzero(eligible)
    values = similarities[candidates]
    if len(candidates) > top_k:
        # argpartition selects the best top_k in linear time; only those are sorted.
        chosen = np.argpartition(-values, top_k - 1)[:top_k]
        candidates, values = candidates[chosen], values[chosen]
    order = np.argsort(-values, kind="stable")
    return candidates[order].astype(np.int64)
