"""Rank training documents by how likely they contain annotation errors.

Each method gives every training word or sentence a score (higher means more
suspicious) and a document's score is the maximum or mean over its words or
sentences. Loss, entropy and gradient-norm methods read only the index. The
influence and nearest-neighbour methods compare the training words with a
few validation documents whose labels are known to be clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from segflu_core.influence.head import HeadParams
from segflu_core.influence.index import InfluenceIndex, edge_gradients
from segflu_core.influence.neighbors import type_ids
from segflu_core.influence.scores import grouped_scores, segment_gradient

METHODS = ("sentence-loss", "word-loss", "entropy", "grad-norm", "segment-influence", "instance-influence", "nn")
VALIDATION_METHODS = ("segment-influence", "instance-influence", "nn")
AGGREGATES = ("max", "mean")
# A training word's influence and nearest-neighbour scores average its this many largest values.
TOP_VALUES = 10
# Training words per block of the word-by-validation-word matrices; bounds memory to a few MB per matrix.
BLOCK_WORDS = 2048
FIRST_TOKENS = 12
COLUMNS = ["doc", "score", "sentences", "first_tokens"]


@dataclass
class ValidationWords:
    """Words of the clean validation documents with their gold labels.

    Attributes
    ----------
    features : numpy.ndarray
        float32, shape (V, d).
    residuals : numpy.ndarray
        float32, shape (V, C): word conditional residuals under the gold labels.
    gold, prev_gold, next_gold : numpy.ndarray
        int64, shape (V,): gold label and its neighbours, -1 at sentence ends.
    offsets : numpy.ndarray
        int64, shape (sentences + 1,): first word of each validation sentence.
    """

    features: np.ndarray
    residuals: np.ndarray
    gold: np.ndarray
    prev_gold: np.ndarray
    next_gold: np.ndarray
    offsets: np.ndarray


def word_gradient_norms(features: np.ndarray, residuals: np.ndarray, prev_gold: np.ndarray, next_gold: np.ndarray) -> np.ndarray:
    """Compute ``‖∇θ CL_u‖`` of every word's conditional loss from its factors.

    ``‖∇_W‖² + ‖∇_b‖² = ‖r‖²(‖h‖² + 1)``. The transition, start and end parts
    add ``2‖r‖²`` (one ``‖r‖²`` per side, from ``A`` or from ``π``/``ω``)
    plus ``2 r[p] r[q]`` when both neighbours exist, from the cross term of
    ``onehot(p) rᵀ + r onehot(q)ᵀ``.

    Returns
    -------
    numpy.ndarray
        float64, shape (N,).
    """
    features = np.asarray(features, dtype=np.float64)
    residuals = np.asarray(residuals, dtype=np.float64)
    rows = np.arange(len(residuals))
    squared_residuals = (residuals**2).sum(1)
    squared = squared_residuals * ((features**2).sum(1) + 3.0)
    both = (prev_gold >= 0) & (next_gold >= 0)
    cross = residuals[rows, np.maximum(prev_gold, 0)] * residuals[rows, np.maximum(next_gold, 0)]
    return np.sqrt(squared + 2.0 * np.where(both, cross, 0.0))


def word_gradient_gram(train_block: tuple, validation: ValidationWords) -> np.ndarray:
    """Compute ``g_uᵀ g_v`` for training words ``u`` and validation words ``v`` from the factors.

    With ``-1`` for a missing neighbour, ``[p_u = p_v]`` covers both equal
    previous labels and two first words (the start-transition term), and
    likewise for the next labels and the end transitions.

    Parameters
    ----------
    train_block : tuple
        ``(features (m, d), residuals (m, C), prev_gold (m,), next_gold (m,))``.

    Returns
    -------
    numpy.ndarray
        float32, shape (m, V).
    """
    features, residuals, prev_gold, next_gold = train_block
    residuals = np.asarray(residuals, dtype=np.float32)
    # shape: (m, V)
    residual_dots = residuals @ validation.residuals.T
    factor = features @ validation.features.T + 1.0
    factor += prev_gold[:, None] == validation.prev_gold[None, :]
    factor += next_gold[:, None] == validation.next_gold[None, :]
    gram = residual_dots * factor
    # Cross terms r_u[q_v] r_v[p_u] and r_v[q_u] r_u[p_v], present when both labels exist.
    forward = residuals[:, np.maximum(validation.next_gold, 0)] * validation.residuals[:, np.maximum(prev_gold, 0)].T
    gram += np.where((prev_gold[:, None] >= 0) & (validation.next_gold[None, :] >= 0), forward, 0.0)
    backward = validation.residuals[:, np.maximum(next_gold, 0)].T * residuals[:, np.maximum(validation.prev_gold, 0)]
    gram += np.where((next_gold[:, None] >= 0) & (validation.prev_gold[None, :] >= 0), backward, 0.0)
    return gram


def mean_of_largest(values: np.ndarray, count: int) -> np.ndarray:
    """Average the ``count`` largest finite values of each row; rows without one give ``-inf``."""
    count = min(count, values.shape[1])
    if count == 0:
        return np.full(values.shape[0], -np.inf)
    largest = -np.partition(-values, count - 1, axis=1)[:, :count]
    finite = np.isfinite(largest)
    totals = np.where(finite, largest, 0.0).sum(1)
    counts = finite.sum(1)
    return np.where(counts > 0, totals / np.maximum(counts, 1), -np.inf)


def train_blocks(index: InfluenceIndex):
    """Yield ``(rows, (features, residuals, prev_gold, next_gold))`` blocks of the training words."""
    features = index.features("train")
    for first in range(0, len(features), BLOCK_WORDS):
        rows = slice(first, min(first + BLOCK_WORDS, len(features)))
        yield rows, (
            features[rows],
            index["train_word_residuals"][rows],
            np.asarray(index["train_prev_gold"][rows], dtype=np.int64),
            np.asarray(index["train_next_gold"][rows], dtype=np.int64),
        )


def segment_influence_scores(index: InfluenceIndex, validation: ValidationWords) -> np.ndarray:
    """Score each training word by the mean of its largest influences ``I = −g_uᵀ g_v`` on validation words.

    Positive influence raises the clean validation loss, so a high score is suspicious.
    """
    scores = np.empty(index["train_gold"].shape[0])
    for rows, block in train_blocks(index):
        scores[rows] = mean_of_largest(-word_gradient_gram(block, validation), TOP_VALUES)
    return scores


def nearest_neighbour_scores(index: InfluenceIndex, validation: ValidationWords) -> np.ndarray:
    """Score each training word by the mean of its largest feature dot products with validation words of another type."""
    type_of_label = type_ids(index.labels)
    validation_types = type_of_label[validation.gold]
    scores = np.empty(index["train_gold"].shape[0])
    for rows, (features, _, _, _) in train_blocks(index):
        train_types = type_of_label[np.asarray(index["train_gold"][rows], dtype=np.int64)]
        # shape: (m, V)
        dots = features @ validation.features.T
        dots[train_types[:, None] == validation_types[None, :]] = -np.inf
        scores[rows] = mean_of_largest(dots, TOP_VALUES)
    return scores


def instance_influence_scores(index: InfluenceIndex, validation: ValidationWords) -> np.ndarray:
    """Score each training sentence by its mean instance influence on the validation sentences."""
    head = index.head
    total = np.zeros(head.size)
    num_sentences = len(validation.offsets) - 1
    for sentence in range(num_sentences):
        rows = slice(validation.offsets[sentence], validation.offsets[sentence + 1])
        labels = validation.gold[rows]
        total += segment_gradient(validation.features[rows], labels, head, 0, len(labels)).flatten()
    query = HeadParams.unflatten(total / max(num_sentences, 1), head.num_tags, head.dim)
    return grouped_scores(
        query, index.features("train"), index["train_sentence_residuals"], index["train_sentence_ids"],
        *edge_gradients(index, "sentence"),
    )


def validation_from_index(index: InfluenceIndex, split: str, sentences) -> ValidationWords:
    """Collect the stored words of the given sentences of a dev or test split."""
    offsets = index[f"{split}_sentence_offsets"]
    rows = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in sentences]) if len(sentences) else np.array([], dtype=np.int64)
    lengths = np.array([offsets[s + 1] - offsets[s] for s in sentences], dtype=np.int64)
    gold = np.asarray(index[f"{split}_gold"], dtype=np.int64)[rows]
    return _validation(index.features(split)[rows], np.asarray(index[f"{split}_gold_residuals"])[rows], gold, lengths)


def validation_from_features(features: list[np.ndarray], gold: list[np.ndarray], head: HeadParams) -> ValidationWords:
    """Build validation words from freshly computed features, such as those of a corrected corpus file."""
    from segflu_core.influence.index import make_batch, word_terms

    batch = make_batch(features, gold, head)
    residuals = word_terms(batch)["word_residuals"].astype(np.float32)
    lengths = np.array([len(g) for g in gold], dtype=np.int64)
    return _validation(np.concatenate(features).astype(np.float32), residuals, np.concatenate(gold), lengths)


def _validation(features, residuals, gold, lengths) -> ValidationWords:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    first = np.zeros(len(gold), dtype=bool)
    first[offsets[:-1][lengths > 0]] = True
    last = np.zeros(len(gold), dtype=bool)
    last[offsets[1:][lengths > 0] - 1] = True
    gold = np.asarray(gold, dtype=np.int64)
    prev_gold = np.where(first, -1, np.roll(gold, 1))
    next_gold = np.where(last, -1, np.roll(gold, -1))
    return ValidationWords(np.asarray(features, dtype=np.float32), np.asarray(residuals, dtype=np.float32),
                           gold, prev_gold, next_gold, offsets)


def item_scores(index: InfluenceIndex, method: str, validation: ValidationWords | None) -> tuple[np.ndarray, str]:
    """Score training words or sentences; returns the scores and ``"word"`` or ``"sentence"``."""
    if method == "sentence-loss":
        return np.asarray(index["train_sentence_loss"], dtype=np.float64), "sentence"
    if method == "word-loss":
        return np.asarray(index["train_word_loss"], dtype=np.float64), "word"
    if method == "entropy":
        return np.asarray(index["train_entropy"], dtype=np.float64), "word"
    if method == "grad-norm":
        arrays = (index["train_word_residuals"], index["train_prev_gold"], index["train_next_gold"])
        return word_gradient_norms(index.features("train"), *arrays), "word"
    if validation is None or len(validation.gold) == 0:
        raise ValueError(f"expected clean validation words for method {method!r}, got none")
    if method == "segment-influence":
        return segment_influence_scores(index, validation), "word"
    if method == "nn":
        return nearest_neighbour_scores(index, validation), "word"
    return instance_influence_scores(index, validation), "sentence"


def document_scores(scores: np.ndarray, documents: np.ndarray, num_documents: int, aggregate: str) -> np.ndarray:
    """Aggregate item scores per document by ``"max"`` or ``"mean"``; documents without items give NaN."""
    counts = np.bincount(documents, minlength=num_documents)
    if aggregate == "mean":
        totals = np.bincount(documents, weights=scores, minlength=num_documents)
        result = totals / np.maximum(counts, 1)
    else:
        result = np.full(num_documents, -np.inf)
        np.maximum.at(result, documents, scores)
    return np.where(counts > 0, result, np.nan)


def rank_documents(index: InfluenceIndex, train_sentences, method: str, *, validation: ValidationWords | None = None, aggregate: str = "max") -> pd.DataFrame:
    """Rank training documents by a noise score, most suspicious first.

    Returns
    -------
    pandas.DataFrame
        Columns ``doc``, ``score``, ``sentences`` (list of 0-based training
        sentence positions) and ``first_tokens`` (the start of the document's
        first sentence), sorted by descending score.
    """
    if method not in METHODS:
        raise ValueError(f"expected method in {METHODS}, got {method!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"expected aggregate 'max' or 'mean', got {aggregate!r}")
    scores, level = item_scores(index, method, validation)
    sentence_docs = np.array([sentence.doc for sentence in train_sentences], dtype=np.int64)
    item_docs = sentence_docs if level == "sentence" else sentence_docs[np.asarray(index["train_sentence_ids"])]
    num_documents = int(sentence_docs.max()) + 1 if len(sentence_docs) else 0
    per_document = document_scores(scores, item_docs, num_documents, aggregate)
    members: dict[int, list[int]] = {}
    for position, doc in enumerate(sentence_docs):
        members.setdefault(int(doc), []).append(position)
    records = [
        {
            "doc": doc,
            "score": float(per_document[doc]),
            "sentences": sentences,
            "first_tokens": " ".join(train_sentences[sentences[0]].tokens[:FIRST_TOKENS]),
        }
        for doc, sentences in members.items()
    ]
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    return frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
