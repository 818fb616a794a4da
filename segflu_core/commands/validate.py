"""``segflu validate PROJECT``: compare influence predictions with exact retraining of the head.

Takes the first training and dev sentences, refits the CRF head on their
frozen features, picks mispredicted dev words, and for each of them the
training words with the largest ``|I|``. Every such training word is removed
in turn, the head is refitted, and the change of the dev word's conditional
loss is compared with the prediction ``(1/N) g_testᵀ H⁻¹ g_train``. Writes
``pairs.csv``, ``summary.json`` (Pearson, Spearman, sign agreement) and a
scatter plot as ``scatter.html`` and ``scatter.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from segflu_core.influence.head import HeadParams, refit_head
from segflu_core.influence.index import decode, label_indices, make_batch, word_terms
from segflu_core.influence.scores import neighbour_labels, segment_gradient, word_scores
from segflu_core.project import Project


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the project, the sample sizes and the output folder to ``parser``."""
    parser.add_argument("project", help="project folder with a trained model")
    parser.add_argument("--train-sentences", type=int, default=1000, help="first training sentences to refit on (default: 1000)")
    parser.add_argument("--dev-sentences", type=int, default=200, help="first dev sentences to draw test words from (default: 200)")
    parser.add_argument("--test-words", type=int, default=20, help="mispredicted dev words to check (default: 20)")
    parser.add_argument("--top", type=int, default=20, help="training words with the largest |influence| per test word (default: 20)")
    parser.add_argument("--hessian", action="store_true", help="predict with the exact Hessian instead of the identity")
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty weight of the head objective (default: 1e-4)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="refit until max|gradient| <= this (default: 1e-6)")
    parser.add_argument("--seed", type=int, default=0, help="seed for picking the mispredicted dev words (default: 0)")
    parser.add_argument("--out", default=None, help="output folder (default: PROJECT/validation)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device of the encoder (default: auto)")


def split_sample(project: Project, split: str, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return the float64 features and gold label indices of the first ``count`` sentences of a split."""
    if count < 1:
        raise ValueError(f"expected a positive number of {split} sentences, got {count}")
    sentences = [s for s in project.sentences(split)[:count] if s.tokens]
    features = project.tagger.word_features([s.tokens for s in sentences], progress=False)
    gold = label_indices([s.tags for s in sentences], project.tagger.labels, split=split)
    return [f.astype(np.float64) for f in features], gold


def pick_test_words(params, features, gold, labels, *, count: int, seed: int) -> list[tuple[int, int, int]]:
    """Return up to ``count`` mispredicted words as ``(sentence, start, end)``, drawn with a seeded generator."""
    batch = make_batch(features, gold, params)
    predicted = decode(batch, labels)
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in gold])])
    wrong = np.flatnonzero(predicted != np.concatenate(gold))
    chosen = np.sort(np.random.default_rng(seed).permutation(wrong)[:count])
    sentence_of = np.searchsorted(offsets, chosen, side="right") - 1
    return [(int(s), int(w - offsets[s]), int(w - offsets[s] + 1)) for s, w in zip(sentence_of, chosen)]


def train_word_factors(params: HeadParams, features, gold) -> dict:
    """Compute the flat features, word residuals and neighbour labels that :func:`word_scores` needs."""
    previous, following = neighbour_labels(gold)
    return {
        "features": np.concatenate(features),
        "residuals": word_terms(make_batch(features, gold, params))["word_residuals"],
        "previous": previous,
        "following": following,
        "offsets": np.concatenate([[0], np.cumsum([len(g) for g in gold])]),
    }


def top_train_words(params, factor, factors: dict, test_item, dev, *, top: int) -> list[tuple[int, int, int]]:
    """Return the ``top`` training words with the largest ``|I|`` on one test word."""
    from segflu_core.influence.hessian import solve_params

    sentence, start, end = test_item
    query = segment_gradient(dev[0][sentence], dev[1][sentence], params, start, end)
    if factor is not None:
        query = solve_params(factor, query)
    scores = word_scores(query, factors["features"], factors["residuals"], factors["previous"], factors["following"])
    best = np.argsort(-np.abs(scores), kind="stable")[:top]
    offsets = factors["offsets"]
    sentence_of = np.searchsorted(offsets, best, side="right") - 1
    return [(int(s), int(w - offsets[s]), int(w - offsets[s] + 1)) for s, w in zip(sentence_of, best)]


def validate(project: Project, args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    """Run the whole check and return the compared pairs and their correlation summary."""
    from segflu_core.influence.hessian import factor_hessian, head_hessian
    from segflu_core.influence.retrain import correlation_summary, exact_influence_check

    train = split_sample(project, "train", args.train_sentences)
    dev = split_sample(project, "dev", args.dev_sentences)
    params, _ = refit_head(HeadParams.from_tagger(project.tagger), *train, l2=args.l2, tolerance=args.tolerance)
    factor = None
    if args.hessian:
        factor = factor_hessian(head_hessian(params, *train, l2=args.l2))
    test_items = pick_test_words(params, *dev, project.tagger.labels, count=args.test_words, seed=args.seed)
    if not test_items:
        raise ValueError("expected mispredicted dev words, got none; use more --dev-sentences")
    factors = train_word_factors(params, *train)
    pairs = {item: top_train_words(params, factor, factors, item, dev, top=args.top) for item in test_items}
    train_items = list(dict.fromkeys(item for items in pairs.values() for item in items))
    frame = exact_influence_check(
        params, *train, test_items, train_items, l2=args.l2, test_features=dev[0], test_labels=dev[1],
        hessian_factor=factor, tolerance=args.tolerance,
    )
    wanted = {(*test, *train_item) for test, items in pairs.items() for train_item in items}
    keys = zip(frame.test_sentence, frame.test_start, frame.test_end, frame.train_sentence, frame.train_start, frame.train_end)
    frame = frame[[key in wanted for key in keys]].reset_index(drop=True)
    return frame, correlation_summary(frame)


def scatter_chart(frame: pd.DataFrame, summary: dict):
    """Draw predicted against actual loss changes as an Altair scatter plot."""
    import altair as alt

    title = f"Pearson {summary['pearson']:.3f}, Spearman {summary['spearman']:.3f}, n = {summary['n']}"
    return alt.Chart(frame, title=title).mark_circle(size=30, opacity=0.6).encode(
        x=alt.X("predicted:Q", title="predicted change of test loss (influence)"),
        y=alt.Y("actual:Q", title="actual change after retraining"),
        tooltip=["test_sentence", "test_start", "train_sentence", "train_start", "predicted", "actual"],
    ).properties(width=420, height=420)


def run(args: argparse.Namespace) -> int:
    """Run the check, write its files and print the summary."""
    import vl_convert

    project = Project.load(args.project, device=args.device)
    frame, summary = validate(project, args)
    out = Path(args.out) if args.out else project.path / "validation"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "pairs.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    chart = scatter_chart(frame, summary)
    chart.save(str(out / "scatter.html"))
    (out / "scatter.png").write_bytes(vl_convert.vegalite_to_png(chart.to_json(), scale=2))
    print(json.dumps(summary))
    print(f"wrote {out / 'pairs.csv'}, {out / 'summary.json'}, {out / 'scatter.html'} and {out / 'scatter.png'}")
    return 0
