"""``validate``: approximate segment influence against exact retraining of the CRF head.

Protocol of Jain et al. (2022), section 5.1, on frozen encoder features in
place of their GloVe linear model. The head trains on 1,000 CoNLL-2003
training sentences, and 20 mispredicted words of 200 validation sentences
are sampled. For each of them, the 20 training words with the largest
absolute approximate influence ``I = −g_testᵀ H⁻¹ g_train`` are taken.
Each of those training words is removed from the objective in turn, and the
head is refitted to ``max|∇J| ≤ 1e-6`` by L-BFGS. The change of the
validation word's conditional loss is compared with the predicted change
``(1/N) g_testᵀ H⁻¹ g_train`` and with the prediction without Hessian
``(1/N) g_testᵀ g_train``.
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
    read_paper_jsonl,
    train_and_index,
    training_summary,
    write_result,
)
from segflu_core.reproduce.plots import scatter_chart

logger = logging.getLogger(__name__)

NAME = "validate"
L2 = 1e-3
# A larger penalty makes the quick run's small problem better conditioned, so L-BFGS converges in fewer steps.
QUICK_L2 = 1e-2
TOLERANCE = 1e-6
FULL = {"train_sentences": 1000, "validation_sentences": 200, "test_words": 20, "train_words_per_test_word": 20}
QUICK = {"train_sentences": 40, "validation_sentences": 15, "test_words": 3, "train_words_per_test_word": 4}


def sample_sentences(sentences: list, count: int, rng: np.random.Generator) -> list:
    """Return ``count`` sentences with at least one word, drawn without replacement, in file order."""
    candidates = [index for index, sentence in enumerate(sentences) if sentence.tokens]
    chosen = np.sort(rng.choice(len(candidates), size=min(count, len(candidates)), replace=False))
    return [sentences[candidates[i]] for i in chosen]


def split_rows(values: np.ndarray, offsets: np.ndarray, dtype) -> list[np.ndarray]:
    """Split per-word rows into one array per sentence, ``values[offsets[i]:offsets[i + 1]]``."""
    return [np.asarray(values[offsets[i] : offsets[i + 1]], dtype=dtype) for i in range(len(offsets) - 1)]


def pick_test_words(index, count: int, rng: np.random.Generator) -> tuple[list[tuple[int, int, int]], bool]:
    """Sample mispredicted validation words as segments ``(sentence, t, t + 1)``.

    Returns the segments and whether they are mispredicted; when no word is
    mispredicted, random words are returned instead.
    """
    gold = np.asarray(index["dev_gold"])
    predicted = np.asarray(index["dev_predictions"])
    offsets = np.asarray(index["dev_sentence_offsets"])
    wrong = np.flatnonzero(gold != predicted)
    mispredicted = len(wrong) > 0
    pool = wrong if mispredicted else np.arange(len(gold))
    chosen = np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))
    sentence = np.searchsorted(offsets, chosen, side="right") - 1
    return [(int(s), int(w - offsets[s]), int(w - offsets[s]) + 1) for s, w in zip(sentence, chosen)], mispredicted


def top_train_words(index, params, factor, test_features, test_labels, test_item, count: int) -> list[tuple[int, int, int]]:
    """Return the ``count`` training words with the largest absolute approximate influence on ``test_item``."""
    from segflu_core.influence.explain import influence_scores
    from segflu_core.influence.hessian import solve_params
    from segflu_core.influence.scores import segment_gradient

    sentence, start, end = test_item
    gradient = segment_gradient(test_features[sentence], test_labels[sentence], params, start, end)
    scores = influence_scores(index, solve_params(factor, gradient), "word")
    words = np.argsort(-np.abs(scores), kind="stable")[:count]
    sentences = np.asarray(index["train_sentence_ids"])[words]
    positions = np.asarray(index["train_positions"])[words]
    return [(int(s), int(p), int(p) + 1) for s, p in zip(sentences, positions)]


def plain_predictions(frame: pd.DataFrame, params, train, test) -> np.ndarray:
    """Return ``(1/N) g_testᵀ g_train`` for every row of an exact-influence frame (no Hessian)."""
    from segflu_core.influence.scores import segment_gradient

    cache: dict = {}

    def gradient(features, labels, item):
        key = (id(features), *item)
        if key not in cache:
            sentence, start, end = item
            cache[key] = segment_gradient(features[sentence], labels[sentence], params, start, end).flatten()
        return cache[key]

    values = []
    for row in frame.itertuples(index=False):
        test_gradient = gradient(test[0], test[1], (row.test_sentence, row.test_start, row.test_end))
        train_gradient = gradient(train[0], train[1], (row.train_sentence, row.train_start, row.train_end))
        values.append(float(test_gradient @ train_gradient) / len(train[0]))
    return np.array(values)


def run(settings: RunSettings) -> dict:
    """Run the experiment and write ``validate.json``; returns its content."""
    from segflu_core.influence.head import refit_head
    from segflu_core.influence.retrain import correlation_summary, exact_influence_check

    started = time.perf_counter()
    sizes = QUICK if settings.quick else FULL
    l2 = QUICK_L2 if settings.quick else L2
    rng = np.random.default_rng(settings.seed)
    train, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/train_corrected.jsonl"))
    validation, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/validation_corrected.jsonl"))
    splits = {
        "train": sample_sentences(train, sizes["train_sentences"], rng),
        "dev": sample_sentences(validation, sizes["validation_sentences"], rng),
    }
    project = train_and_index(settings, NAME, splits, refit_head=True, hessian=True, l2=l2)
    index = project.index
    factor = np.asarray(index["hessian_factor"])
    train_offsets = np.asarray(index["train_sentence_offsets"])
    dev_offsets = np.asarray(index["dev_sentence_offsets"])
    train_data = (split_rows(index.features("train"), train_offsets, np.float64), split_rows(index["train_gold"], train_offsets, np.int64))
    test_data = (split_rows(index.features("dev"), dev_offsets, np.float64), split_rows(index["dev_gold"], dev_offsets, np.int64))
    params, refit_info = refit_head(index.head, *train_data, l2=l2, tolerance=TOLERANCE, preconditioner=factor)

    test_items, mispredicted = pick_test_words(index, sizes["test_words"], rng)
    selected = {item: top_train_words(index, params, factor, *test_data, item, sizes["train_words_per_test_word"]) for item in test_items}
    train_items = list(dict.fromkeys(word for words in selected.values() for word in words))
    frame = exact_influence_check(
        params, *train_data, test_items, train_items, l2=l2, test_features=test_data[0], test_labels=test_data[1],
        hessian_factor=factor, tolerance=TOLERANCE, progress=settings.progress,
    )
    frame["selected"] = [
        (row.train_sentence, row.train_start, row.train_end) in selected[(row.test_sentence, row.test_start, row.test_end)]
        for row in frame.itertuples(index=False)
    ]
    frame["predicted_without_hessian"] = plain_predictions(frame, params, train_data, test_data)
    pairs = frame[frame["selected"]]
    with_hessian = correlation_summary(pairs)
    without_hessian = correlation_summary(pairs.assign(predicted=pairs["predicted_without_hessian"]))
    figures = {
        "pearson": with_hessian["pearson"],
        "spearman": with_hessian["spearman"],
        "sign_agreement": with_hessian["sign_agreement"],
        "pearson_without_hessian": without_hessian["pearson"],
        "spearman_without_hessian": without_hessian["spearman"],
        "sign_agreement_without_hessian": without_hessian["sign_agreement"],
        "pairs": with_hessian["n"],
        "test_words": len(test_items),
        "test_words_mispredicted": mispredicted,
        "all_pairs": correlation_summary(frame),
        "refit": refit_info,
    }
    plotted = pd.concat([
        pairs.assign(hessian="with Hessian")[["predicted", "actual", "hessian"]],
        pairs.assign(hessian="without Hessian", predicted=pairs["predicted_without_hessian"])[["predicted", "actual", "hessian"]],
    ])
    chart = scatter_chart(plotted, x="predicted", y="actual", color="hessian", title="Predicted vs actual change of conditional loss")
    parameters = {**sizes, "l2": l2, "tolerance": TOLERANCE, **training_summary(project)}
    return write_result(settings, NAME, figures, started=started, parameters=parameters,
                        tables={"pairs": frame}, charts={"scatter": chart})
