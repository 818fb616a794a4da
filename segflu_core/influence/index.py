"""Build and load the influence index of a project.

The index stores what a segment influence query needs, so queries never run
the encoder. Per word it stores the features, the gold label and its
neighbours, and the residuals of three losses: the word's own conditional
loss, its gold span's loss and its sentence's loss. Per training sentence
and per span of two or more words it stores the explicit transition gradient;
everything else of an item's gradient follows from the per-word arrays (see
:func:`edge_gradients`). Every array is a
plain ``.npy`` file that numpy can memory-map; ``docs/index-format.md``
describes each one.

Building runs in two passes over chunks of sentences, so memory stays bounded
by the chunk size: the encoder forward pass writes features to disk, and a
head pass reads them back and runs the CRF kernels. The head pass therefore
works on the stored float16 features, the same numbers that queries use.
The index is written to a temporary folder that replaces ``index/`` only
when it is complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segflu_core import crf
from segflu_core.errors import IndexNotBuiltError, ProjectError
from segflu_core.feature_cache import load_features
from segflu_core.influence.head import HeadParams
from segflu_core.influence.scores import neighbour_labels
from segflu_core.schemes import allowed_transitions, tags_to_spans

logger = logging.getLogger(__name__)

INDEX_FOLDER = "index"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
SPLITS = ("train", "dev", "test")
HEAD_ARRAYS = ("weight", "bias", "transitions", "start", "end")
DEFAULT_CHUNK_SENTENCES = 256
# Rows of multi-word spans sent through segment_conditional at once.
SPAN_BATCH = 512


@dataclass
class GoldSpans:
    """Gold spans of a set of sentences; every O word is a span of its own.

    Attributes
    ----------
    sentence : numpy.ndarray
        int64, shape (num_spans,): row of the span's sentence.
    start, end : numpy.ndarray
        int64, shape (num_spans,): half-open word offsets ``[start, end)``.
    """

    sentence: np.ndarray
    start: np.ndarray
    end: np.ndarray


def gold_spans(tag_lists: list[list[str]]) -> GoldSpans:
    """List the gold entity spans and single O words of each sentence, in reading order."""
    rows, starts, ends = [], [], []
    for row, tags in enumerate(tag_lists):
        covered = np.zeros(len(tags), dtype=bool)
        bounds = []
        for span in tags_to_spans(tags, "iob2"):
            bounds.append((span.start, span.end))
            covered[span.start : span.end] = True
        bounds.extend((t, t + 1) for t in np.flatnonzero(~covered))
        for start, end in sorted(bounds):
            rows.append(row)
            starts.append(start)
            ends.append(end)
    as_array = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
    return GoldSpans(as_array(rows), as_array(starts), as_array(ends))


def label_indices(tag_lists: list[list[str]], labels: list[str], *, split: str) -> list[np.ndarray]:
    """Convert IOB2 tags to label indices.

    Raises
    ------
    ProjectError
        On an empty sentence or a tag that is not one of the model's labels.
    """
    lookup = {label: i for i, label in enumerate(labels)}
    result = []
    for i, tags in enumerate(tag_lists):
        if not tags:
            raise ProjectError(f"{split} sentence {i} has no tokens; remove the empty sentence from the data file")
        unknown = [tag for tag in tags if tag not in lookup]
        if unknown:
            raise ProjectError(
                f"{split} sentence {i}: tag {unknown[0]!r} is not one of the model's labels {labels}; "
                "retrain the model on data that contains this tag or fix the tag"
            )
        result.append(np.array([lookup[tag] for tag in tags], dtype=np.int64))
    return result


@dataclass
class Batch:
    """Padded sentences of one chunk as float64 tensors for the CRF kernels.

    Attributes
    ----------
    emissions : torch.Tensor
        float64, shape (batch, seq_len, C).
    tags : torch.Tensor
        int64, shape (batch, seq_len); zero at padding.
    mask : torch.Tensor
        bool, shape (batch, seq_len).
    lengths : numpy.ndarray
        int64, shape (batch,).
    """

    emissions: torch.Tensor
    tags: torch.Tensor
    mask: torch.Tensor
    lengths: np.ndarray
    head: tuple = field(repr=False, default=())

    def flat(self, tensor: torch.Tensor) -> np.ndarray:
        """Return the rows of a (batch, seq_len, ...) tensor at real words, in reading order."""
        return tensor[self.mask].numpy()


def make_batch(features: list[np.ndarray], tags: list[np.ndarray], params: HeadParams) -> Batch:
    """Pad sentences and compute their emissions ``W h + b`` in float64."""
    lengths = np.array([len(t) for t in tags], dtype=np.int64)
    batch, seq_len = len(tags), int(lengths.max())
    mask = np.arange(seq_len)[None, :] < lengths[:, None]
    padded_tags = np.zeros((batch, seq_len), dtype=np.int64)
    padded_tags[mask] = np.concatenate(tags)
    flat_features = np.concatenate(features).astype(np.float64)
    # shape: (num_words, C)
    flat_emissions = flat_features @ params.weight.T + params.bias
    emissions = np.zeros((batch, seq_len, params.num_tags))
    emissions[mask] = flat_emissions
    head = tuple(torch.from_numpy(a) for a in (params.transitions, params.start, params.end))
    return Batch(torch.from_numpy(emissions), torch.from_numpy(padded_tags), torch.from_numpy(mask), lengths, head)


def observed_transition_counts(tags: torch.Tensor, edge_mask: torch.Tensor, num_tags: int) -> torch.Tensor:
    """Count gold tag pairs on the selected edges.

    Parameters
    ----------
    tags : torch.Tensor
        int64, shape (batch, seq_len).
    edge_mask : torch.Tensor
        bool, shape (batch, seq_len - 1): edge ``t`` joins words ``t`` and ``t + 1``.

    Returns
    -------
    torch.Tensor
        float64, shape (batch, C, C).
    """
    # shape: (batch, seq_len - 1) index of the pair (y_t, y_{t+1}) in a flattened C × C table
    pair_index = tags[:, :-1] * num_tags + tags[:, 1:]
    counts = torch.zeros(tags.shape[0], num_tags * num_tags, dtype=torch.float64)
    counts.scatter_add_(1, pair_index, edge_mask.to(torch.float64))
    return counts.reshape(-1, num_tags, num_tags)


def decode(batch: Batch, labels: list[str]) -> np.ndarray:
    """Return the Viterbi labels of every word, restricted to IOB2-valid sequences; int64, shape (num_words,)."""
    allowed_start, allowed, allowed_end = (torch.from_numpy(a) for a in allowed_transitions(labels))
    paths = crf.viterbi_decode(
        batch.emissions, batch.mask, *batch.head,
        allowed_start=allowed_start, allowed=allowed, allowed_end=allowed_end,
    )
    return np.concatenate([np.asarray(path, dtype=np.int64) for path in paths])


def word_terms(batch: Batch) -> dict[str, np.ndarray]:
    """Compute each word's conditional loss, residuals and marginal entropy given its gold neighbours."""
    conditional = crf.word_conditional(batch.emissions, batch.tags, batch.mask, *batch.head)
    marginals = conditional.marginals
    # shape: (batch, seq_len)
    entropy = -(marginals * torch.log(marginals.clamp_min(1e-300))).sum(-1)
    return {
        "word_residuals": batch.flat(conditional.residuals),
        "word_loss": -batch.flat(conditional.log_likelihood),
        "entropy": batch.flat(entropy),
    }


def sentence_terms(batch: Batch) -> dict[str, np.ndarray]:
    """Compute each sentence's instance loss, residuals and explicit transition gradient."""
    emissions, tags, mask = batch.emissions, batch.tags, batch.mask
    num_tags = emissions.shape[-1]
    node = crf.marginals(emissions, mask, *batch.head)
    # shape: (batch, seq_len, C)
    residuals = node - torch.eye(num_tags, dtype=torch.float64)[tags] * mask[..., None]
    edges = crf.pairwise_marginals(emissions, mask, *batch.head)
    # shape: (batch, C, C)
    transition_gradient = edges.sum(1) - observed_transition_counts(tags, mask[:, 1:], num_tags)
    loss = crf.log_partition(emissions, mask, *batch.head) - crf.path_score(emissions, tags, mask, *batch.head)
    return {
        "sentence_residuals": batch.flat(residuals),
        "sentence_loss": loss.numpy(),
        "sentence_transitions": transition_gradient.numpy(),
    }


def single_word_span_terms(batch: Batch, rows: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Compute the loss and residuals of one-word spans, whose conditional is the word's own conditional.

    Their transition, start and end gradients are not stored: they follow
    from the word residuals and the neighbouring gold labels.
    """
    conditional = crf.word_conditional(batch.emissions, batch.tags, batch.mask, *batch.head)
    return {
        "residuals": conditional.residuals[rows, positions].numpy(),
        "loss": -conditional.log_likelihood[rows, positions].numpy(),
    }


def multi_word_span_terms(batch: Batch, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> dict[str, np.ndarray]:
    """Compute the conditional loss, residuals and transition gradient of spans of two or more words.

    Returns residuals as a (num_spans, seq_len, C) array that is zero outside
    each span, so it can be added into the sentence rows.
    """
    num_tags = batch.emissions.shape[-1]
    seq_positions = torch.arange(batch.emissions.shape[1] - 1)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("residuals", "loss", "transitions")}
    for first in range(0, len(rows), SPAN_BATCH):
        row = torch.from_numpy(rows[first : first + SPAN_BATCH])
        start = torch.from_numpy(starts[first : first + SPAN_BATCH])
        end = torch.from_numpy(ends[first : first + SPAN_BATCH])
        tags, mask = batch.tags[row], batch.mask[row]
        result = crf.segment_conditional(batch.emissions[row], tags, mask, *batch.head, start, end)
        lengths = torch.from_numpy(batch.lengths)[row]
        # shape: (spans, seq_len - 1); edge t joins words t and t + 1 and touches [start, end)
        touching = (seq_positions >= start[:, None] - 1) & (seq_positions <= end[:, None] - 1)
        touching &= seq_positions < lengths[:, None] - 1
        transitions = result.pairwise.sum(1) - observed_transition_counts(tags, touching, num_tags)
        parts["residuals"].append(result.residuals.numpy())
        parts["loss"].append(-result.log_likelihood.numpy())
        parts["transitions"].append(transitions.numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def span_terms(batch: Batch, spans: GoldSpans) -> dict[str, np.ndarray]:
    """Compute per-span losses, the span residual of every word and the transition gradients of multi-word spans.

    Returns ``span_residuals`` (num_words, C) in reading order,
    ``span_loss`` (num_spans,) in the order of ``spans`` and
    ``span_transitions`` (num_multiword, C, C) for the spans of two or more
    words, in the same order.
    """
    num_tags = batch.emissions.shape[-1]
    single = np.flatnonzero(spans.end - spans.start == 1)
    multi = np.flatnonzero(spans.end - spans.start > 1)
    padded_residuals = np.zeros(tuple(batch.emissions.shape))
    result = {"span_loss": np.zeros(len(spans.sentence)), "span_transitions": np.zeros((len(multi), num_tags, num_tags))}
    if len(single):
        terms = single_word_span_terms(batch, spans.sentence[single], spans.start[single])
        padded_residuals[spans.sentence[single], spans.start[single]] = terms["residuals"]
        result["span_loss"][single] = terms["loss"]
    if len(multi):
        terms = multi_word_span_terms(batch, spans.sentence[multi], spans.start[multi], spans.end[multi])
        np.add.at(padded_residuals, spans.sentence[multi], terms["residuals"])
        result["span_loss"][multi] = terms["loss"]
        result["span_transitions"] = terms["transitions"]
    result["span_residuals"] = padded_residuals[batch.mask.numpy()]
    return result


class ArrayWriter:
    """Create ``.npy`` files in a folder and remember their shapes and dtypes for the manifest."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.arrays: dict[str, dict] = {}
        # Sentence offsets of each split, set by the builder before the head pass.
        self.offsets: dict[str, np.ndarray] = {}

    def create(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Create ``name.npy`` as a writable memory map of ``shape`` and ``dtype``."""
        self.arrays[name] = {"shape": [int(s) for s in shape], "dtype": np.dtype(dtype).name}
        return np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))

    def save(self, name: str, array: np.ndarray) -> None:
        """Write a whole array to ``name.npy``."""
        self.arrays[name] = {"shape": list(array.shape), "dtype": array.dtype.name}
        np.save(self.folder / f"{name}.npy", array)


def sentence_offsets(token_lists: list[list[str]]) -> np.ndarray:
    """Return the first word index of each sentence and the total, int64, shape (num_sentences + 1,)."""
    return np.concatenate([[0], np.cumsum([len(tokens) for tokens in token_lists])]).astype(np.int64)


def write_features(writer: ArrayWriter, split: str, tagger, token_lists, *, batch_size: int, chunk_sentences: int, progress: bool) -> np.ndarray:
    """Run the encoder over a split in chunks and store float16 features as ``{split}_features``.

    Returns the memory-mapped array, shape (num_words, d).
    """
    offsets = sentence_offsets(token_lists)
    stored = None
    with tqdm(total=len(token_lists), desc=f"features {split}", unit="sentence", disable=not progress) as bar:
        for first in range(0, len(token_lists), chunk_sentences):
            chunk = token_lists[first : first + chunk_sentences]
            features = tagger.word_features(chunk, batch_size=batch_size, progress=False)
            if stored is None:
                stored = writer.create(f"{split}_features", (int(offsets[-1]), features[0].shape[1]), np.float16)
            stored[offsets[first] : offsets[first] + sum(len(t) for t in chunk)] = np.concatenate(features)
            bar.update(len(chunk))
    if stored is None:
        stored = writer.create(f"{split}_features", (0, tagger.encoder.feature_dim), np.float16)
    stored.flush()
    return stored


def copy_features(writer: ArrayWriter, split: str, saved: np.ndarray, *, chunk_words: int) -> np.ndarray:
    """Store features saved at training (float16, (num_words, d)) as ``{split}_features``, in chunks."""
    stored = writer.create(f"{split}_features", saved.shape, np.float16)
    for first in range(0, saved.shape[0], chunk_words):
        stored[first : first + chunk_words] = saved[first : first + chunk_words]
    stored.flush()
    return stored


def sentence_features(features: np.ndarray, offsets: np.ndarray, first: int, last: int) -> list[np.ndarray]:
    """Slice the float32 features of sentences ``[first, last)`` from the flat feature array."""
    return [np.asarray(features[offsets[i] : offsets[i + 1]], dtype=np.float32) for i in range(first, last)]


def write_train_layout(writer: ArrayWriter, gold: list[np.ndarray], spans: GoldSpans, offsets: np.ndarray) -> None:
    """Store the arrays that follow from the gold labels alone: labels, ids and span bounds."""
    lengths = np.diff(offsets)
    previous, following = neighbour_labels(gold)
    writer.save("train_sentence_offsets", offsets)
    writer.save("train_gold", np.concatenate(gold).astype(np.int32))
    writer.save("train_prev_gold", previous.astype(np.int32))
    writer.save("train_next_gold", following.astype(np.int32))
    writer.save("train_sentence_ids", np.repeat(np.arange(len(gold)), lengths).astype(np.int32))
    writer.save("train_positions", np.concatenate([np.arange(n) for n in lengths]).astype(np.int32))
    writer.save("train_span_ids", np.repeat(np.arange(len(spans.start)), spans.end - spans.start).astype(np.int32))
    writer.save("train_span_sentence", spans.sentence.astype(np.int32))
    writer.save("train_span_start", spans.start.astype(np.int32))
    writer.save("train_span_end", spans.end.astype(np.int32))
    writer.save("train_multiword_spans", multiword_spans(spans).astype(np.int32))


def multiword_spans(spans: GoldSpans) -> np.ndarray:
    """Return the ids of the spans of two or more words, ascending; int64, shape (num_multiword,)."""
    return np.flatnonzero(spans.end - spans.start > 1)


TRAIN_WORD_ARRAYS = {
    "word_residuals": np.float32,
    "span_residuals": np.float32,
    "sentence_residuals": np.float32,
    "word_loss": np.float32,
    "entropy": np.float32,
    "predictions": np.int32,
}


def create_train_outputs(writer: ArrayWriter, num_words: int, spans: GoldSpans, num_sentences: int, num_tags: int) -> dict[str, np.ndarray]:
    """Create the memory maps that the head pass over the training split fills chunk by chunk."""
    shapes = {
        "word_residuals": (num_words, num_tags),
        "span_residuals": (num_words, num_tags),
        "sentence_residuals": (num_words, num_tags),
        "word_loss": (num_words,),
        "entropy": (num_words,),
        "predictions": (num_words,),
    }
    outputs = {name: writer.create(f"train_{name}", shapes[name], dtype) for name, dtype in TRAIN_WORD_ARRAYS.items()}
    other_shapes = {
        "span_loss": (len(spans.start),),
        "span_transitions": (len(multiword_spans(spans)), num_tags, num_tags),
        "sentence_loss": (num_sentences,),
        "sentence_transitions": (num_sentences, num_tags, num_tags),
    }
    for name, shape in other_shapes.items():
        outputs[name] = writer.create(f"train_{name}", shape, np.float32)
    return outputs


def write_train_terms(writer, features, gold, spans, params, labels, *, chunk_sentences: int, progress: bool) -> None:
    """Run the CRF kernels over the training split in chunks and store residuals, losses and gradients."""
    offsets = writer.offsets["train"]
    outputs = create_train_outputs(writer, int(offsets[-1]), spans, len(gold), params.num_tags)
    span_first = np.searchsorted(spans.sentence, np.arange(len(gold) + 1))
    # Row of the first multi-word span at or after each span, for slicing span_transitions by chunk.
    multiword_first = np.searchsorted(multiword_spans(spans), span_first)
    for first in tqdm(range(0, len(gold), chunk_sentences), desc="index train", unit="chunk", disable=not progress):
        last = min(first + chunk_sentences, len(gold))
        batch = make_batch(sentence_features(features, offsets, first, last), gold[first:last], params)
        span_slice = slice(span_first[first], span_first[last])
        chunk_spans = GoldSpans(spans.sentence[span_slice] - first, spans.start[span_slice], spans.end[span_slice])
        terms = {**word_terms(batch), **sentence_terms(batch), **span_terms(batch, chunk_spans)}
        terms["predictions"] = decode(batch, labels)
        word_slice = slice(offsets[first], offsets[last])
        for name, output in outputs.items():
            if name == "span_transitions":
                output[multiword_first[first] : multiword_first[last]] = terms[name]
            elif name == "span_loss":
                output[span_slice] = terms[name]
            elif name.startswith("sentence_") and name != "sentence_residuals":
                output[first:last] = terms[name]
            else:
                output[word_slice] = terms[name]
    for output in outputs.values():
        output.flush()


def write_eval_terms(writer, split, features, gold, params, labels, *, chunk_sentences: int, progress: bool) -> None:
    """Store gold labels, predictions and word residuals under gold and predicted labels for a dev or test split."""
    offsets = writer.offsets[split]
    num_words, num_tags = int(offsets[-1]), params.num_tags
    writer.save(f"{split}_sentence_offsets", offsets)
    writer.save(f"{split}_gold", np.concatenate([np.zeros(0, dtype=np.int64), *gold]).astype(np.int32))
    predictions = writer.create(f"{split}_predictions", (num_words,), np.int32)
    residuals = {
        name: writer.create(f"{split}_{name}_residuals", (num_words, num_tags), np.float32)
        for name in ("gold", "predicted")
    }
    for first in tqdm(range(0, len(gold), chunk_sentences), desc=f"index {split}", unit="chunk", disable=not progress):
        last = min(first + chunk_sentences, len(gold))
        batch = make_batch(sentence_features(features, offsets, first, last), gold[first:last], params)
        predicted = decode(batch, labels)
        word_slice = slice(offsets[first], offsets[last])
        predictions[word_slice] = predicted
        residuals["gold"][word_slice] = word_terms(batch)["word_residuals"]
        batch.tags[batch.mask] = torch.from_numpy(predicted)
        residuals["predicted"][word_slice] = word_terms(batch)["word_residuals"]
    for array in (predictions, *residuals.values()):
        array.flush()


def corpus_digest(sentences) -> str:
    """Return the SHA-256 of the tokens and tags of a split's sentences, in order."""
    digest = hashlib.sha256()
    for sentence in sentences:
        digest.update("\t".join(sentence.tokens).encode("utf-8") + b"\n")
        digest.update("\t".join(sentence.tags).encode("utf-8") + b"\n")
    return digest.hexdigest()


def edits_signature(state) -> dict | None:
    """Summarise a split's edit history for the manifest, or return ``None`` when the split has no edits.

    ``state`` lists ``(id, undone)`` of every edit of the split in id order
    (:meth:`segflu_core.project.Project.edit_state`). Any new edit, undo or
    redo changes the ``state_sha256`` of the result.
    """
    state = [[int(edit_id), bool(undone)] for edit_id, undone in state]
    if not state:
        return None
    encoded = json.dumps(state, separators=(",", ":")).encode("utf-8")
    return {"last_id": max(edit_id for edit_id, _undone in state), "state_sha256": hashlib.sha256(encoded).hexdigest()}


def split_edit_state(project, split: str) -> tuple:
    """Return the project's edit state of a split, or no edits for a project object without an edit store."""
    return project.edit_state(split) if hasattr(project, "edit_state") else ()


def split_entry(project, split: str, num_sentences: int, num_words: int, state: tuple) -> dict:
    """Return the manifest entry of a split: counts, digests of the labels used and of the data file, edit state.

    ``state`` is the edit state read before the split's labels were, so an edit
    saved during the build is recomputed by the next update instead of being
    recorded as applied.
    """
    original = project.original_sentences(split) if hasattr(project, "original_sentences") else project.sentences(split)
    return {
        "sentences": num_sentences,
        "words": num_words,
        "sha256": corpus_digest(project.sentences(split)),
        "source_sha256": corpus_digest(original),
        "edits": edits_signature(state),
    }


def head_digest(params: HeadParams) -> str:
    """Return the SHA-256 of the flattened float64 head parameters, which identifies the head the index was built with."""
    return hashlib.sha256(np.ascontiguousarray(params.flatten()).tobytes()).hexdigest()


def save_head(writer: ArrayWriter, params: HeadParams) -> None:
    """Store the head the index was built with as ``head_{weight,bias,transitions,start,end}.npy``, float64."""
    for name in HEAD_ARRAYS:
        writer.save(f"head_{name}", getattr(params, name))


def training_features(features: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Split the stored training features into float64 arrays per sentence for refitting and the Hessian."""
    return [np.asarray(features[offsets[i] : offsets[i + 1]], dtype=np.float64) for i in range(len(offsets) - 1)]


def refit(params: HeadParams, features: np.ndarray, offsets: np.ndarray, gold, *, l2: float, tolerance: float) -> tuple[HeadParams, dict]:
    """Refit the head on the frozen training features; needs all of them in memory as float64."""
    from segflu_core.influence.head import refit_head

    logger.info("refitting the head on %d training sentences (l2=%g)", len(gold), l2)
    params, info = refit_head(params, training_features(features, offsets), gold, l2=l2, tolerance=tolerance)
    logger.info("refit finished after %d iterations, max |gradient| %.3g", info["iterations"], info["max_abs_gradient"])
    return params, info


def write_hessian(writer: ArrayWriter, params: HeadParams, features, offsets, gold, *, l2: float, progress: bool) -> None:
    """Compute the Hessian of the head objective and store its lower Cholesky factor as ``hessian_factor``."""
    from segflu_core.influence.hessian import factor_hessian, head_hessian

    hessian = head_hessian(params, training_features(features, offsets), gold, l2=l2, progress=progress)
    writer.save("hessian_factor", factor_hessian(hessian))


def replace_folder(built: Path, final: Path) -> None:
    """Move a completed index into place, removing the previous one only after the new one is there."""
    previous = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(previous)
    built.rename(final)
    if previous.exists():
        shutil.rmtree(previous)


def build_index(
    project,
    *,
    refit_head: bool = False,
    hessian: bool = False,
    batch_size: int = 32,
    chunk_sentences: int = DEFAULT_CHUNK_SENTENCES,
    l2: float = 1e-4,
    tolerance: float = 1e-6,
    progress: bool = True,
) -> Path:
    """Build ``PROJECT/index`` from the project's tagger and corpora.

    Parameters
    ----------
    project : segflu_core.project.Project
        A project with a trained model and at least a training split.
    refit_head : bool
        Refit the head on the frozen training features (L-BFGS, float64,
        penalty ``l2``) and build the index with the refitted head.
    hessian : bool
        Also store the Cholesky factor of the Hessian of the head objective.
    batch_size : int
        Sentences per encoder batch.
    chunk_sentences : int
        Sentences per chunk of the feature and head passes; bounds memory.
    l2 : float
        Weight ``λ`` of the ``(λ/2)‖θ‖²`` penalty for refitting and the Hessian.
    tolerance : float
        Refitting stops once ``max|∇J| ≤ tolerance``.

    Returns
    -------
    pathlib.Path
        The index folder.
    """
    if batch_size < 1 or chunk_sentences < 1:
        raise ValueError(f"expected batch_size >= 1 and chunk_sentences >= 1, got {batch_size} and {chunk_sentences}")
    final = project.path / INDEX_FOLDER
    building = project.path / f".{INDEX_FOLDER}.building-{os.getpid()}"
    if building.exists():
        shutil.rmtree(building)
    building.mkdir()
    try:
        manifest = _build_into(project, building, refit_head=refit_head, hessian=hessian, batch_size=batch_size,
                               chunk_sentences=chunk_sentences, l2=l2, tolerance=tolerance, progress=progress)
        (building / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_folder(building, final)
        if hasattr(project, "reload_index"):
            project.reload_index()
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    logger.info("influence index written to %s", final)
    return final


def _build_into(project, folder: Path, *, refit_head, hessian, batch_size, chunk_sentences, l2, tolerance, progress) -> dict:
    tagger = project.tagger
    labels = list(tagger.labels)
    writer = ArrayWriter(folder)
    splits = [split for split in SPLITS if split in project.splits]
    if "train" not in splits:
        raise ProjectError(f"{project.path / 'project.json'}: no train split; add data.train and retrain")
    features, gold = {}, {}
    edit_states = {split: split_edit_state(project, split) for split in splits}
    if not project.sentences("train"):
        raise ProjectError(f"{project.data_path('train')}: no training sentences; add annotated sentences and retrain")
    for split in splits:
        sentences = project.sentences(split)
        token_lists = [list(sentence.tokens) for sentence in sentences]
        writer.offsets[split] = sentence_offsets(token_lists)
        gold[split] = label_indices([list(sentence.tags) for sentence in sentences], labels, split=split)
        saved = load_features(project.path, split, token_lists, tagger)
        if saved is not None:
            logger.info("using the word features saved at training for %s", split)
            features[split] = copy_features(writer, split, saved, chunk_words=chunk_sentences * 64)
        else:
            features[split] = write_features(writer, split, tagger, token_lists, batch_size=batch_size,
                                             chunk_sentences=chunk_sentences, progress=progress)

    params = HeadParams.from_tagger(tagger)
    refit_info = None
    if refit_head:
        params, refit_info = refit(params, features["train"], writer.offsets["train"], gold["train"], l2=l2, tolerance=tolerance)
    save_head(writer, params)

    train_tags = [list(sentence.tags) for sentence in project.sentences("train")]
    spans = gold_spans(train_tags)
    write_train_layout(writer, gold["train"], spans, writer.offsets["train"])
    write_train_terms(writer, features["train"], gold["train"], spans, params, labels,
                      chunk_sentences=chunk_sentences, progress=progress)
    for split in splits[1:]:
        write_eval_terms(writer, split, features[split], gold[split], params, labels,
                         chunk_sentences=chunk_sentences, progress=progress)
    if hessian:
        write_hessian(writer, params, features["train"], writer.offsets["train"], gold["train"], l2=l2, progress=progress)

    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "labels": labels,
        "encoder": getattr(tagger, "encoder_origin", None),
        "head_sha256": head_digest(params),
        "refit_head": refit_info,
        "l2": l2,
        "hessian": hessian,
        "splits": {
            split: split_entry(project, split, len(gold[split]), int(writer.offsets[split][-1]), edit_states[split])
            for split in splits
        },
        "train_spans": len(spans.start),
        "arrays": writer.arrays,
    }


def edge_gradients(index: "InfluenceIndex", granularity: str, items=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rebuild the transition, start and end gradients ``G_A``, ``G_π``, ``G_ω`` of training spans or sentences.

    Only the transition gradients of sentences and of spans of two or more
    words are stored, and the rest follows from the per-word arrays. ``G_π``
    is the item's residual at the sentence's first word when the item
    contains it, and zero otherwise. ``G_ω`` is the same at the last word. A
    one-word span's ``G_A`` is ``onehot(y_{t-1}) r_tᵀ + r_t onehot(y_{t+1})ᵀ``,
    without the term of a missing neighbour.

    Parameters
    ----------
    index : InfluenceIndex
        A built index.
    granularity : str
        ``"span"`` or ``"sentence"``.
    items : array of int, optional
        Span or sentence ids; all items by default.

    Returns
    -------
    tuple of numpy.ndarray
        float64 arrays of shapes (G, C, C), (G, C) and (G, C).
    """
    offsets = np.asarray(index["train_sentence_offsets"], dtype=np.int64)
    num_tags = len(index.labels)
    if granularity == "sentence":
        items = np.arange(len(offsets) - 1) if items is None else np.asarray(items, dtype=np.int64)
        residuals = index["train_sentence_residuals"]
        transitions = np.asarray(index["train_sentence_transitions"][items], dtype=np.float64)
        start = np.asarray(residuals[offsets[items]], dtype=np.float64)
        end = np.asarray(residuals[offsets[items + 1] - 1], dtype=np.float64)
        return transitions, start, end
    if granularity != "span":
        raise ValueError(f"expected granularity 'span' or 'sentence', got {granularity!r}")
    items = np.arange(index["train_span_start"].shape[0]) if items is None else np.asarray(items, dtype=np.int64)
    sentence = np.asarray(index["train_span_sentence"][items], dtype=np.int64)
    span_start = np.asarray(index["train_span_start"][items], dtype=np.int64)
    span_end = np.asarray(index["train_span_end"][items], dtype=np.int64)
    first_row, last_row = offsets[sentence] + span_start, offsets[sentence] + span_end - 1
    residuals = index["train_span_residuals"]
    start = np.where((span_start == 0)[:, None], np.asarray(residuals[first_row], dtype=np.float64), 0.0)
    end = np.where((last_row == offsets[sentence + 1] - 1)[:, None], np.asarray(residuals[last_row], dtype=np.float64), 0.0)
    transitions = np.zeros((len(items), num_tags, num_tags))
    stored_ids = np.asarray(index["train_multiword_spans"], dtype=np.int64)
    is_multiword = span_end - span_start > 1
    stored_rows = np.searchsorted(stored_ids, items[is_multiword])
    transitions[is_multiword] = index["train_span_transitions"][stored_rows]
    single = np.flatnonzero(~is_multiword)
    single_residuals = np.asarray(residuals[first_row[single]], dtype=np.float64)
    previous = np.asarray(index["train_prev_gold"][first_row[single]], dtype=np.int64)
    following = np.asarray(index["train_next_gold"][first_row[single]], dtype=np.int64)
    has_previous, has_next = previous >= 0, following >= 0
    transitions[single[has_previous], previous[has_previous], :] += single_residuals[has_previous]
    transitions[single[has_next], :, following[has_next]] += single_residuals[has_next]
    return transitions, start, end


class InfluenceIndex:
    """A built index: its manifest and memory-mapped arrays.

    Arrays are opened on first use with ``numpy.load(mmap_mode="r")``.
    :meth:`features` converts a split's float16 features to float32 once and
    keeps them in memory, because float32 matrix products are many times
    faster than float16 ones in numpy.
    """

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] = {}
        self._features: dict[str, np.ndarray] = {}
        self._head: HeadParams | None = None
        self._derived: dict[str, object] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike, *, project_path: str | os.PathLike | None = None) -> "InfluenceIndex":
        """Open the index in ``folder``.

        Raises
        ------
        IndexNotBuiltError
            When the folder has no manifest or was written by another format version.
        """
        folder = Path(folder)
        command = f"segflu index {project_path if project_path is not None else folder.parent}"
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise IndexNotBuiltError(f"{manifest_path}: file not found; build the index with `{command}`")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexNotBuiltError(
                f"{manifest_path}: expected index format_version {FORMAT_VERSION}, got "
                f"{manifest.get('format_version')!r}; rebuild the index with `{command}`"
            )
        return cls(folder, manifest)

    @property
    def labels(self) -> list[str]:
        """IOB2 labels in the order of the label indices stored in the arrays."""
        return list(self.manifest["labels"])

    @property
    def splits(self) -> list[str]:
        """Splits stored in the index, ``"train"`` first."""
        return list(self.manifest["splits"])

    def has(self, name: str) -> bool:
        """Return whether the array ``name`` is stored."""
        return name in self.manifest["arrays"]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            if not self.has(name):
                raise KeyError(f"index array {name!r} not stored in {self.folder}")
            self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def features(self, split: str) -> np.ndarray:
        """Return the float32 features of a split, shape (num_words, d), converted once and cached."""
        if split not in self._features:
            self._features[split] = np.asarray(self[f"{split}_features"], dtype=np.float32)
        return self._features[split]

    def cached(self, name: str, compute):
        """Return a value derived from the index, computing it with ``compute()`` on first use."""
        if name not in self._derived:
            self._derived[name] = compute()
        return self._derived[name]

    @property
    def head(self) -> HeadParams:
        """The head parameters the index was built with."""
        if self._head is None:
            self._head = HeadParams(*(np.array(self[f"head_{name}"]) for name in HEAD_ARRAYS))
        return self._head
