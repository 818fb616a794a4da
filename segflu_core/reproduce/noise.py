"""``noise-synthetic`` and ``noise-real``: ranking training documents to find annotation errors.

Protocol of Jain et al. (2022), sections 6.1 and 6.2. Every method of
:mod:`segflu_core.influence.noise` scores the training documents (word or
sentence scores combined by maximum and by mean), a seeded random order is
the floor, and a fraction-found curve counts the share of erroneous
documents among the first ``k`` documents of each ranking.

- ``noise-synthetic`` trains on ``train_corrected_modified_docs.jsonl``
  (one document per line): 20 soccer documents have city names turned from
  ORG into LOC, and 100 documents have random entity types. The clean set is
  10 validation documents that start with ``SOCCER``.
- ``noise-real`` trains on the original CoNLL-2003 labels
  (``train_original.jsonl``); the erroneous documents are those whose labels
  differ in the corrected file. The clean set is 10 validation documents
  whose corrected labels differ from the original ones. cleanlab's
  token-classification ranking on the same model's marginals is an
  external baseline.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from segflu_core.reproduce.common import (
    PAPER_DATA,
    RunSettings,
    data_file,
    group_documents,
    read_paper_jsonl,
    train_and_index,
    training_summary,
    write_result,
)
from segflu_core.reproduce.plots import curve_chart

logger = logging.getLogger(__name__)

RECALL_AT = (50, 100, 200)
CLEAN_DOCUMENTS = 10
QUICK_CLEAN_DOCUMENTS = 2
QUICK_DOCUMENTS_PER_GROUP = 6


def found_fraction_curve(order_is_bad: np.ndarray) -> np.ndarray:
    """Return the share of bad documents among the first ``k`` ranked documents, for ``k = 1 .. n``.

    Parameters
    ----------
    order_is_bad : numpy.ndarray
        bool, shape (n,): whether the document at each rank is erroneous.

    Returns
    -------
    numpy.ndarray
        float64, shape (n,); non-decreasing, and 1 at ``k = n`` when any document is bad.
    """
    order_is_bad = np.asarray(order_is_bad, dtype=bool)
    total = order_is_bad.sum()
    if total == 0:
        return np.zeros(len(order_is_bad))
    return np.cumsum(order_is_bad) / total


def ranking_order(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order documents by descending score; ties are broken at random and NaN scores go last."""
    scores = np.asarray(scores, dtype=np.float64)
    keys = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((rng.random(len(scores)), -keys))


def method_scores(project, clean_docs: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Score every training document with each noise method and aggregate; returns label -> scores per doc."""
    from segflu_core.influence import noise

    index = project.index
    train = project.sentences("train")
    sentence_docs = np.array([sentence.doc for sentence in train], dtype=np.int64)
    word_docs = sentence_docs[np.asarray(index["train_sentence_ids"])]
    num_documents = int(sentence_docs.max()) + 1
    validation = project.clean_validation(clean_docs)
    scores = {"random": rng.random(num_documents)}
    for method in noise.METHODS:
        item_scores, level = noise.item_scores(index, method, validation)
        documents = sentence_docs if level == "sentence" else word_docs
        for aggregate in noise.AGGREGATES:
            scores[f"{method}-{aggregate}"] = noise.document_scores(item_scores, documents, num_documents, aggregate)
    return scores


def cleanlab_scores(project) -> np.ndarray:
    """Score documents by 1 − the lowest cleanlab label quality of their sentences.

    cleanlab's ``get_label_quality_scores`` takes each word's gold label and
    its predicted label distribution; the distribution here is the CRF
    sentence marginal ``μ = residual + onehot(gold)`` stored in the index.
    """
    from cleanlab.token_classification.rank import get_label_quality_scores

    index = project.index
    offsets = np.asarray(index["train_sentence_offsets"])
    gold = np.asarray(index["train_gold"], dtype=np.int64)
    # shape: (N, C)
    marginals = np.asarray(index["train_sentence_residuals"], dtype=np.float64)
    marginals[np.arange(len(gold)), gold] += 1.0
    marginals = np.clip(marginals, 0.0, 1.0)
    marginals /= marginals.sum(axis=1, keepdims=True)
    labels = [gold[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    probabilities = [marginals[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    sentence_scores, _ = get_label_quality_scores(labels, probabilities)
    docs = np.array([sentence.doc for sentence in project.sentences("train")], dtype=np.int64)
    lowest = np.full(int(docs.max()) + 1, np.inf)
    np.minimum.at(lowest, docs, np.asarray(sentence_scores, dtype=np.float64))
    return 1.0 - lowest


def curves_and_recall(scores: dict[str, np.ndarray], truth: dict[str, np.ndarray], rng) -> tuple[pd.DataFrame, dict]:
    """Build the fraction-found curves of every method and noise kind, the recall at 50, 100 and 200 documents and the area under each curve."""
    frames, recall = [], {}
    for kind, is_bad in truth.items():
        recall[kind] = {}
        for label, values in scores.items():
            curve = found_fraction_curve(is_bad[ranking_order(values, rng)])
            frames.append(pd.DataFrame({"noise": kind, "method": label, "documents": np.arange(1, len(curve) + 1), "found": curve}))
            recall[kind][label] = {f"at_{k}": float(curve[min(k, len(curve)) - 1]) for k in RECALL_AT}
            # The mean of the curve is the area under it per document: higher when bad documents rank
            # earlier, about 0.5 for a random order.
            recall[kind][label]["area"] = float(curve.mean())
    return pd.concat(frames, ignore_index=True), recall


def best_methods(recall: dict) -> dict:
    """Return, per noise kind, the method with the highest recall at 100 documents, ties broken by area."""
    return {
        kind: max(methods, key=lambda label: (methods[label]["at_100"], methods[label]["area"]))
        for kind, methods in recall.items()
    }


def synthetic_data(settings: RunSettings, rng) -> tuple[dict, dict, list[int]]:
    """Load the splits, the truth per noise kind and the clean soccer documents of ``noise-synthetic``."""
    train, metadata = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/train_corrected_modified_docs.jsonl"), sentence_ids=False)
    validation, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/validation_corrected.jsonl"))
    kinds = np.array([str(meta.get("modified")) for meta in metadata])
    if settings.quick:
        keep = np.concatenate([rng.choice(np.flatnonzero(kinds == kind), size=QUICK_DOCUMENTS_PER_GROUP, replace=False)
                               for kind in ("org_to_loc", "random", "None")])
        keep.sort()
        train, kinds = [train[i] for i in keep], kinds[keep]
    documents = group_documents(validation)
    soccer = [doc for doc, members in enumerate(documents) if validation[members[0]].tokens[:1] == ["SOCCER"]]
    count = QUICK_CLEAN_DOCUMENTS if settings.quick else CLEAN_DOCUMENTS
    clean = sorted(int(doc) for doc in rng.choice(soccer, size=min(count, len(soccer)), replace=False))
    if settings.quick:
        validation = [validation[i] for doc in clean for i in documents[doc]]
        clean = list(range(len(clean)))
    truth = {"org_to_loc": kinds == "org_to_loc", "random": kinds == "random"}
    return {"train": train, "dev": validation}, truth, clean


def changed_documents(original: list, corrected: list) -> np.ndarray:
    """Return, per document of ``original``, whether any of its sentences has other tags in ``corrected``."""
    corrected_tags = {sentence.id: sentence.tags for sentence in corrected}
    documents = group_documents(original)
    return np.array([any(original[i].tags != corrected_tags.get(original[i].id) for i in members) for members in documents])


def real_data(settings: RunSettings, rng) -> tuple[dict, dict, list[int]]:
    """Load the splits, the truth and the clean corrected documents of ``noise-real``."""
    train, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/train_original.jsonl"))
    corrected, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/train_corrected.jsonl"))
    validation, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/validation_corrected.jsonl"))
    validation_original, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/validation_original.jsonl"))
    is_bad = changed_documents(train, corrected)
    documents = group_documents(train)
    if settings.quick:
        keep = np.concatenate([rng.choice(np.flatnonzero(is_bad == flag), size=QUICK_DOCUMENTS_PER_GROUP, replace=False)
                               for flag in (True, False)])
        keep.sort()
        train, is_bad = [train[i] for doc in keep for i in documents[doc]], is_bad[keep]
    validation_documents = group_documents(validation)
    corrected_docs = np.flatnonzero(changed_documents(validation_original, validation))
    count = QUICK_CLEAN_DOCUMENTS if settings.quick else CLEAN_DOCUMENTS
    clean = sorted(int(doc) for doc in rng.choice(corrected_docs, size=min(count, len(corrected_docs)), replace=False))
    if settings.quick:
        validation = [validation[i] for doc in clean for i in validation_documents[doc]]
        clean = list(range(len(clean)))
    return {"train": train, "dev": validation}, {"annotation_errors": is_bad}, clean


def run(settings: RunSettings, *, kind: str) -> dict:
    """Run ``noise-synthetic`` (``kind="synthetic"``) or ``noise-real`` (``kind="real"``); returns the JSON content."""
    if kind not in ("synthetic", "real"):
        raise ValueError(f"expected kind 'synthetic' or 'real', got {kind!r}")
    started = time.perf_counter()
    name = f"noise-{kind}"
    rng = np.random.default_rng(settings.seed)
    splits, truth, clean = (synthetic_data if kind == "synthetic" else real_data)(settings, rng)
    project = train_and_index(settings, name, splits)
    scores = method_scores(project, clean, rng)
    if kind == "real":
        scores["cleanlab"] = cleanlab_scores(project)
    curves, recall = curves_and_recall(scores, truth, rng)
    figures = {
        "documents": len(next(iter(truth.values()))),
        "bad_documents": {kind_name: int(flags.sum()) for kind_name, flags in truth.items()},
        "recall": recall,
        "best_method": best_methods(recall),
    }
    chart = curve_chart(curves, x="documents", y="found", color="method", facet="noise", title="Fraction of erroneous documents found")
    parameters = {
        "clean_documents": clean,
        "train_documents": figures["documents"],
        **training_summary(project),
    }
    if kind == "real":
        import cleanlab

        parameters["cleanlab_version"] = cleanlab.__version__
    return write_result(settings, name, figures, started=started, parameters=parameters,
                        tables={"curves": curves}, charts={"curves": chart})
