"""Measure index size and build time, explain latency and noise ranking on a trained project.

Run it on a project trained on CoNLL-2003 (see train_conll.py). It builds the
index twice, without and with the Hessian, and times the plain encoder forward
pass over the same training words. Then it times ``Project.explain`` on the
test set's mispredicted entities and the same number of queries against a
naive store of full per-word gradients.

    python benchmarks/influence_conll.py runs/conll-frozen --queries 50
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from common import peak_memory_mb, write_result

from segflu_core.influence.index import build_index
from segflu_core.influence.noise import METHODS
from segflu_core.project import Project

logger = logging.getLogger("influence_conll")


def folder_bytes(folder: Path) -> int:
    """Total size of the files below ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def time_forward(project: Project, batch_size: int) -> float:
    """Seconds of the encoder forward pass over the training sentences alone."""
    tokens = [sentence.tokens for sentence in project.sentences("train")]
    started = time.perf_counter()
    project.tagger.word_features(tokens, batch_size=batch_size, progress=True)
    return time.perf_counter() - started


def median_ms(call, queries) -> float:
    """Median wall time of ``call(query)`` over the queries, in milliseconds."""
    timings = []
    for query in queries:
        started = time.perf_counter()
        call(query)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


class ScannedShare(logging.Handler):
    """Collect the share of training words that word queries scored before their scan stopped."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.shares: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("scored"):
            scored, total = record.args
            self.shares.append(scored / total)


def naive_gradient_store(index, num_tags: int) -> np.ndarray:
    """Full per-word gradients of the emission weights and bias, ``(N_tok, C·(d+1))`` float32.

    This is the store that the factorised index avoids: every training word
    keeps its whole ``r ⊗ [h, 1]`` gradient instead of ``h`` and ``r``.
    """
    features = index.features("train")
    residuals = np.asarray(index["train_word_residuals"], dtype=np.float32)
    num_words, dim = features.shape
    store = np.empty((num_words, num_tags * (dim + 1)), dtype=np.float32)
    for first in range(0, num_words, 8192):
        last = min(num_words, first + 8192)
        block = np.concatenate([features[first:last], np.ones((last - first, 1), np.float32)], axis=1)
        # shape: (words, C, d + 1) -> (words, C·(d + 1))
        store[first:last] = np.einsum("nc,nd->ncd", residuals[first:last], block).reshape(last - first, -1)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--queries", type=int, default=50, help="mispredicted test entities to explain")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-forward", action="store_true",
                        help="do not time a separate encoder pass over the training words")
    parser.add_argument("--refit-head", action="store_true", help="refit the head before computing the Hessian")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    project = Project.load(args.project)
    forward_seconds = None if args.skip_forward else time_forward(project, args.batch_size)

    # A frozen-encoder project reuses the features saved at training, so this
    # build runs no encoder; a fine-tuned one runs the encoder over every split.
    started = time.perf_counter()
    build_index(project, batch_size=args.batch_size)
    index_seconds = time.perf_counter() - started
    index_bytes = folder_bytes(args.project / "index")

    started = time.perf_counter()
    build_index(project, batch_size=args.batch_size, refit_head=args.refit_head, hessian=True)
    hessian_index_seconds = time.perf_counter() - started
    project = Project.load(args.project)
    index = project.index
    num_words = index.features("train").shape[0]
    num_tags = len(project.labels)
    dim = index.features("train").shape[1]
    train_index_bytes = sum(
        (index.folder / f"{name}.npy").stat().st_size for name in index.manifest["arrays"] if name.startswith("train_")
    )

    errors = project.errors("test")
    queries = list(errors[["sentence", "start", "end"]].itertuples(index=False, name=None))[: args.queries]
    explain = lambda q, **kw: project.explain("test", *q, labels="predicted", **kw)  # noqa: E731
    explain(queries[0])  # first call converts features to float32 and loads arrays
    scanned = ScannedShare()
    scan_logger = logging.getLogger("segflu_core.influence.explain")
    scan_logger.addHandler(scanned)
    scan_logger.setLevel(logging.DEBUG)
    scan_logger.propagate = False
    latency = {
        "segment_word": median_ms(lambda q: explain(q), queries),
        "segment_span": median_ms(lambda q: explain(q, granularity="span"), queries),
        "instance": median_ms(lambda q: explain(q, method="instance"), queries),
    }
    word_shares, scanned.shares = scanned.shares, []
    latency["segment_word_hessian"] = median_ms(lambda q: explain(q, hessian=True), queries)
    hessian_shares = scanned.shares
    scan_logger.removeHandler(scanned)
    scan_logger.propagate = True
    latency["nn_cosine"] = median_ms(lambda q: explain(q, method="nn-cosine"), queries)

    store = naive_gradient_store(index, num_tags)
    rng = np.random.default_rng(0)
    query_vectors = [rng.standard_normal(store.shape[1]).astype(np.float32) for _ in queries]
    naive_ms = median_ms(lambda vector: store @ vector, query_vectors)
    full_gradient_bytes_per_word = 4 * (num_tags * dim + num_tags + num_tags**2 + 2 * num_tags)
    del store

    rank_seconds = {}
    for method in METHODS:
        started = time.perf_counter()
        project.rank_noise(method)
        rank_seconds[method] = round(time.perf_counter() - started, 2)

    result = {
        "project": str(args.project),
        "train_words": num_words,
        "feature_dim": dim,
        "num_tags": num_tags,
        "forward_seconds": None if forward_seconds is None else round(forward_seconds, 1),
        "index_seconds": round(index_seconds, 1),
        "index_to_forward_ratio": None if forward_seconds is None else round(index_seconds / forward_seconds, 3),
        "hessian_index_seconds": round(hessian_index_seconds, 1),
        "refit_head": args.refit_head,
        "index_bytes_total": index_bytes,
        "train_index_bytes_per_word": round(train_index_bytes / num_words, 1),
        "full_gradient_bytes_per_word": full_gradient_bytes_per_word,
        "explain_median_ms": {name: round(value, 2) for name, value in latency.items()},
        "word_query_scored_share_median": round(statistics.median(word_shares), 4),
        "word_query_scored_share_median_hessian": round(statistics.median(hessian_shares), 4),
        "naive_full_gradient_median_ms": round(naive_ms, 2),
        "queries": len(queries),
        "rank_noise_seconds": rank_seconds,
        "peak_memory_mb": round(peak_memory_mb()),
    }
    path = write_result("influence-conll", result)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
