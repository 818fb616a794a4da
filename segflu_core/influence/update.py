"""Update a built influence index in place after label edits.

The features and the head of an index do not depend on the gold labels. A
relabelled sentence therefore needs only its label-dependent arrays
recomputed: gold labels and their neighbours, the word, span and sentence
residuals, the word loss and entropy, the sentence's loss and transition
gradient, and the rows of its gold spans. The number of spans of a sentence
can change, so the span arrays are rewritten with that sentence's rows
replaced. Predictions,
features, the head and the Hessian factor stay as they are: the Hessian of the
CRF loss is the Hessian of ``log Z``, which does not depend on the labels.

Each changed array is written to a temporary file in the index folder and
moved over the old file with ``os.replace``. The manifest is replaced last.
Readers that memory-mapped the old files keep reading the old data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from segflu_core.errors import ProjectError
from segflu_core.influence.index import (
    DEFAULT_CHUNK_SENTENCES,
    INDEX_FOLDER,
    MANIFEST_NAME,
    GoldSpans,
    InfluenceIndex,
    corpus_digest,
    edits_signature,
    gold_spans,
    label_indices,
    make_batch,
    sentence_terms,
    span_terms,
    word_terms,
)
from segflu_core.influence.scores import neighbour_labels

logger = logging.getLogger(__name__)

# Per-word training arrays that follow from the labels; predictions and features do not.
WORD_TERMS = ("word_residuals", "word_loss", "entropy", "sentence_residuals", "span_residuals")
SENTENCE_TERMS = ("sentence_loss", "sentence_transitions")
# Streamlit runs each session's script on its own thread, so updates of one process run one at a time.
# NOTE: two processes that update the same index at once are not serialised.
UPDATE_LOCK = threading.RLock()


def sync_edits(project, index: InfluenceIndex) -> dict[str, list[int]]:
    """Recompute the sentences whose current labels differ from the labels stored in ``index``.

    Parameters
    ----------
    project : segflu_core.project.Project
        The project; ``project.sentences(split)`` gives the current (edited) labels.
    index : InfluenceIndex
        The project's index as opened before the update.

    Returns
    -------
    dict
        Per split of the index, the sorted positions of the recomputed
        sentences; empty lists when the index was up to date.
    """
    updated: dict[str, list[int]] = {}
    for split in index.splits:
        updated[split] = []
        signature = edits_signature(project.edit_state(split))
        if index.manifest["splits"][split].get("edits") == signature:
            continue
        with UPDATE_LOCK:
            # Another thread may have updated the index on disk while this one waited.
            on_disk = InfluenceIndex.load(index.folder, project_path=project.path)
            if on_disk.manifest["splits"][split].get("edits") == signature:
                continue
            stale = stale_sentences(project, on_disk, split)
            try:
                update_index_sentences(project, split, stale, edits=signature)
            except OSError as error:
                logger.error("updating %s for the %s label edits failed: %s", index.folder, split, error)
                raise ProjectError(
                    f"{index.folder}: updating the index for the {split} label edits failed ({error}); "
                    f"make the folder writable, or rebuild the index with `segflu index {project.path}`"
                ) from error
        updated[split] = stale
    return updated


def stale_sentences(project, index: InfluenceIndex, split: str) -> list[int]:
    """Return the sentences of ``split`` whose current gold labels differ from the index's ``{split}_gold``."""
    sentences = project.sentences(split)
    offsets = np.asarray(index[f"{split}_sentence_offsets"])
    if len(sentences) != len(offsets) - 1:
        raise ValueError(f"expected {len(offsets) - 1} {split} sentences as in the index, got {len(sentences)}")
    if not sentences:
        return []
    current = np.concatenate(label_indices([s.tags for s in sentences], index.labels, split=split))
    changed_words = np.flatnonzero(current != np.asarray(index[f"{split}_gold"]))
    # The sentence of word w is the last sentence whose first word is at or before w.
    return sorted({int(s) for s in np.searchsorted(offsets, changed_words, side="right") - 1})


# Default of ``update_index_sentences(edits=...)``: keep the edit state recorded in the manifest.
KEEP_EDITS = object()


def update_index_sentences(project, split: str, sentences: list[int], *, edits=KEEP_EDITS) -> None:
    """Recompute the label-dependent index arrays of some sentences from their current gold labels.

    Parameters
    ----------
    project : segflu_core.project.Project
        The project whose ``index/`` is updated; its ``sentences(split)``
        gives the current labels, and the index's stored features and head
        are used.
    split : str
        A split stored in the index.
    sentences : list of int
        0-based sentence positions of the split to recompute.
    edits : dict or None, optional
        The edit state to record in the manifest (see
        :func:`segflu_core.influence.index.edits_signature`). By default the
        recorded one stays.
    """
    folder = Path(project.path) / INDEX_FOLDER
    with UPDATE_LOCK:
        index = InfluenceIndex.load(folder, project_path=project.path)
        if split not in index.splits:
            raise ValueError(f"expected a split in {index.splits}, got {split!r}")
        current = project.sentences(split)
        chosen = np.unique(np.asarray(sentences, dtype=np.int64))
        if len(chosen) and not (0 <= chosen[0] and chosen[-1] < len(current)):
            raise ValueError(f"expected sentence positions in [0, {len(current)}), got {sorted(set(sentences))}")
        gold = label_indices([current[i].tags for i in chosen], index.labels, split=split)
        arrays = train_arrays(index, chosen, gold) if split == "train" else eval_arrays(index, split, chosen, gold)
        manifest = updated_manifest(index, split, arrays, current, edits)
        replace_arrays(folder, arrays, manifest)
    logger.info("updated %d %s sentences of the index in %s", len(chosen), split, folder)
    if hasattr(project, "reload_index"):
        project.reload_index()


def sentence_rows(offsets: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Return the word rows of the chosen sentences in order; int64, shape (num_chosen_words,)."""
    if not len(chosen):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in chosen])


def chunk_terms(index: InfluenceIndex, split: str, chosen: np.ndarray, gold: list[np.ndarray], *, train: bool) -> dict[str, np.ndarray]:
    """Run the CRF kernels over the chosen sentences in chunks, with the index's features and head.

    Returns per-word terms in the order of the chosen sentences' words, per-sentence
    terms in the order of ``chosen`` and, for ``train``, per-span terms with
    ``span_sentence``, ``span_start`` and ``span_end`` in reading order.
    """
    offsets = np.asarray(index[f"{split}_sentence_offsets"])
    features = index[f"{split}_features"]
    parts: dict[str, list[np.ndarray]] = {}
    for first in range(0, len(chosen), DEFAULT_CHUNK_SENTENCES):
        chunk = chosen[first : first + DEFAULT_CHUNK_SENTENCES]
        chunk_gold = gold[first : first + DEFAULT_CHUNK_SENTENCES]
        batch = make_batch([np.asarray(features[offsets[i] : offsets[i + 1]], dtype=np.float32) for i in chunk],
                           chunk_gold, index.head)
        terms = word_terms(batch)
        if train:
            spans = gold_spans([[index.labels[label] for label in labels] for labels in chunk_gold])
            terms |= sentence_terms(batch) | span_terms(batch, spans)
            terms |= {"span_sentence": chunk[spans.sentence], "span_start": spans.start, "span_end": spans.end}
        for name, values in terms.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def eval_arrays(index: InfluenceIndex, split: str, chosen: np.ndarray, gold: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Return new ``{split}_gold`` and ``{split}_gold_residuals`` arrays with the chosen sentences recomputed."""
    rows = sentence_rows(np.asarray(index[f"{split}_sentence_offsets"]), chosen)
    new_gold = np.array(index[f"{split}_gold"])
    residuals = np.array(index[f"{split}_gold_residuals"])
    if len(chosen):
        new_gold[rows] = np.concatenate(gold)
        residuals[rows] = chunk_terms(index, split, chosen, gold, train=False)["word_residuals"]
    return {f"{split}_gold_residuals": residuals, f"{split}_gold": new_gold}


def train_arrays(index: InfluenceIndex, chosen: np.ndarray, gold: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Return the training arrays that change when the chosen sentences get the labels ``gold``.

    ``train_gold`` comes last, so a crash between two file replacements
    leaves the old gold labels, and the next update recomputes the sentence.
    """
    offsets = np.asarray(index["train_sentence_offsets"])
    rows = sentence_rows(offsets, chosen)
    terms = chunk_terms(index, "train", chosen, gold, train=True) if len(chosen) else {}
    arrays: dict[str, np.ndarray] = {}
    previous, following = neighbour_labels(gold)
    word_values = {"prev_gold": previous, "next_gold": following, **{name: terms.get(name) for name in WORD_TERMS}}
    for name, values in word_values.items():
        arrays[f"train_{name}"] = np.array(index[f"train_{name}"])
        if len(chosen):
            arrays[f"train_{name}"][rows] = values
    for name in SENTENCE_TERMS:
        arrays[f"train_{name}"] = np.array(index[f"train_{name}"])
        if len(chosen):
            arrays[f"train_{name}"][chosen] = terms[name]
    if len(chosen):
        arrays |= replaced_spans(index, chosen, terms)
    new_gold = np.array(index["train_gold"])
    if len(chosen):
        new_gold[rows] = np.concatenate(gold)
    arrays["train_gold"] = new_gold
    return arrays


def replaced_spans(index: InfluenceIndex, chosen: np.ndarray, terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the span arrays with the spans of the chosen sentences replaced, in reading order, and ``train_span_ids``.

    ``train_span_transitions`` has rows for multi-word spans only, so its
    kept and new rows are ordered by their spans' new ids, which also gives
    the new ``train_multiword_spans``.
    """
    span_sentence = np.asarray(index["train_span_sentence"])
    keep = ~np.isin(span_sentence, chosen)
    sentence_values = np.concatenate([span_sentence[keep], terms["span_sentence"]])
    start_values = np.concatenate([np.asarray(index["train_span_start"])[keep], terms["span_start"]])
    # Spans partition each sentence, so (sentence, start) orders them in reading order.
    order = np.lexsort((start_values, sentence_values))
    arrays = {}
    for name in ("span_sentence", "span_start", "span_end", "span_loss"):
        old = index[f"train_{name}"]
        arrays[f"train_{name}"] = np.concatenate([np.asarray(old)[keep], terms[name].astype(old.dtype)])[order]
    lengths = arrays["train_span_end"].astype(np.int64) - arrays["train_span_start"]
    arrays["train_span_ids"] = np.repeat(np.arange(len(lengths)), lengths).astype(index["train_span_ids"].dtype)

    # Position of each span in the concatenation above -> its new id.
    new_id = np.empty(len(order), dtype=np.int64)
    new_id[order] = np.arange(len(order))
    old_multiword = np.asarray(index["train_multiword_spans"], dtype=np.int64)
    kept_multiword = keep[old_multiword]
    kept_position = np.cumsum(keep) - 1
    new_lengths = terms["span_end"] - terms["span_start"]
    multiword_ids = np.concatenate([
        new_id[kept_position[old_multiword[kept_multiword]]],
        new_id[int(keep.sum()) + np.flatnonzero(new_lengths > 1)],
    ])
    old_transitions = index["train_span_transitions"]
    transitions = np.concatenate([np.asarray(old_transitions)[kept_multiword], terms["span_transitions"].astype(old_transitions.dtype)])
    by_id = np.argsort(multiword_ids, kind="stable")
    arrays["train_span_transitions"] = transitions[by_id]
    arrays["train_multiword_spans"] = multiword_ids[by_id].astype(index["train_multiword_spans"].dtype)
    return arrays


def updated_manifest(index: InfluenceIndex, split: str, arrays: dict[str, np.ndarray], sentences: list, edits) -> dict:
    """Return the manifest after the update: array shapes, span count, label digest and edit state."""
    manifest = json.loads(json.dumps(index.manifest))
    for name, array in arrays.items():
        manifest["arrays"][name] = {"shape": [int(n) for n in array.shape], "dtype": array.dtype.name}
    if "train_span_start" in arrays:
        manifest["train_spans"] = int(len(arrays["train_span_start"]))
    entry = manifest["splits"][split]
    entry["sha256"] = corpus_digest(indexed_sentences(sentences, arrays[f"{split}_gold"], index))
    if edits is not KEEP_EDITS:
        entry["edits"] = edits
    return manifest


def indexed_sentences(sentences: list, gold: np.ndarray, index: InfluenceIndex) -> list[SimpleNamespace]:
    """Pair each sentence's tokens with the labels stored in the updated index, for the manifest digest."""
    # One vectorised lookup instead of one per word keeps this cheap for large splits.
    tags = np.asarray(index.labels, dtype=object)[gold].tolist()
    paired, first = [], 0
    for sentence in sentences:
        last = first + len(sentence.tokens)
        paired.append(SimpleNamespace(tokens=sentence.tokens, tags=tags[first:last]))
        first = last
    return paired


def replace_arrays(folder: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """Write every array to a temporary file, then move them over the old files and the manifest last."""
    suffix = f".updating-{os.getpid()}"
    written: list[tuple[Path, Path]] = []
    try:
        for name, array in arrays.items():
            temporary = folder / f".{name}.npy{suffix}"
            with open(temporary, "wb") as handle:
                np.save(handle, array)
            written.append((temporary, folder / f"{name}.npy"))
        temporary_manifest = folder / f".{MANIFEST_NAME}{suffix}"
        temporary_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        written.append((temporary_manifest, folder / MANIFEST_NAME))
    except BaseException:
        for temporary, _final in written:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, final in written:
        os.replace(temporary, final)
