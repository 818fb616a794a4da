"""Explain queries: influence scores against brute-force gradient dot products, neighbours and conflicts."""

from __future__ import annotations

import numpy as np
import pytest

from segflu_core.errors import IndexNotBuiltError
from segflu_core.influence import explain as explain_module
from segflu_core.influence.conflicts import ConflictUnits, flag_conflicts
from segflu_core.influence.index import build_index, edge_gradients
from segflu_core.influence.scores import grouped_scores, segment_gradient, word_scores
from segflu_core.project import Project, sentence_errors
from tests.test_index import LABELS, indexed_project, sentence_arrays, write_tiny_project  # noqa: F401


def train_gradient(index, sentence: int, start: int, end: int) -> np.ndarray:
    features, labels = sentence_arrays(index, "train", sentence)
    return segment_gradient(features, labels, index.head, start, end).flatten()


def query_gradient(project, split: str, sentence: int, start: int, end: int, labels: str) -> np.ndarray:
    query = project.stored_query(split, sentence, start, end, labels=labels)
    return segment_gradient(query.features, query.labels, project.index.head, start, end).flatten()


@pytest.mark.parametrize("granularity", ["word", "span", "sentence"])
@pytest.mark.parametrize("labels", ["gold", "predicted"])
def test_scores_equal_gradient_dot_products(indexed_project, granularity, labels):
    index = indexed_project.index
    test_gradient = query_gradient(indexed_project, "test", 2, 0, 2, labels)
    rows = indexed_project.explain("test", 2, 0, 2, labels=labels, granularity=granularity, top_k=4)
    assert len(rows) > 0
    for row in rows.itertuples():
        expected = -test_gradient @ train_gradient(index, row.sentence, row.start, row.end)
        assert row.score == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_hessian_scores_use_inverse_hessian(indexed_project):
    index = indexed_project.index
    factor = np.asarray(index["hessian_factor"])
    hessian = factor @ factor.T
    test_gradient = query_gradient(indexed_project, "test", 1, 0, 1, "gold")
    solved = np.linalg.solve(hessian, test_gradient)
    rows = indexed_project.explain("test", 1, 0, 1, hessian=True, granularity="span", top_k=3)
    for row in rows.itertuples():
        expected = -solved @ train_gradient(index, row.sentence, row.start, row.end)
        assert row.score == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_stored_factor_matches_objective_curvature(indexed_project):
    from segflu_core.influence.head import HeadParams, head_objective

    index = indexed_project.index
    head, l2 = index.head, index.manifest["l2"]
    offsets = index["train_sentence_offsets"]
    sentences = [sentence_arrays(index, "train", i) for i in range(len(offsets) - 1)]
    features = [f.astype(np.float64) for f, _ in sentences]
    gold = [labels for _, labels in sentences]
    factor = np.asarray(index["hessian_factor"])

    def gradient_at(vector):
        return head_objective(HeadParams.unflatten(vector, head.num_tags, head.dim), features, gold, l2=l2)[1].flatten()

    # Hessian-vector products by central differences of the objective's gradient.
    rng = np.random.default_rng(0)
    step = 1e-4
    for _ in range(3):
        direction = rng.standard_normal(head.size)
        expected = (gradient_at(head.flatten() + step * direction) - gradient_at(head.flatten() - step * direction)) / (2 * step)
        np.testing.assert_allclose(factor @ (factor.T @ direction), expected, rtol=1e-4, atol=1e-6)


def test_instance_method_uses_sentence_losses(indexed_project):
    index = indexed_project.index
    query = indexed_project.stored_query("test", 3, 1, 2)
    test_gradient = segment_gradient(query.features, query.labels, index.head, 0, len(query.labels)).flatten()
    rows = indexed_project.explain("test", 3, 1, 2, method="instance", top_k=2)
    for row in rows.itertuples():
        assert row.start == 0
        expected = -test_gradient @ train_gradient(index, row.sentence, 0, row.end)
        assert row.score == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_rows_sorted_with_correct_roles(indexed_project):
    index = indexed_project.index
    top_k = 5
    rows = indexed_project.explain("dev", 0, 0, 2, top_k=top_k)
    assert list(rows.columns) == explain_module.COLUMNS
    assert rows["score"].is_monotonic_increasing
    assert set(rows.loc[rows.score < 0, "role"]) <= {"supporting"}
    assert set(rows.loc[rows.score > 0, "role"]) <= {"opposing"}

    query = indexed_project.stored_query("dev", 0, 0, 2)
    vector = segment_gradient(query.features, query.labels, index.head, 0, 2)
    all_scores = explain_module.influence_scores(index, vector, "word")
    negative = np.sort(all_scores[all_scores < 0])
    positive = np.sort(all_scores[all_scores > 0])
    num_supporting = min(top_k, len(negative))
    assert (rows.role == "supporting").sum() == num_supporting
    assert (rows.role == "opposing").sum() == min(top_k, len(positive))
    np.testing.assert_allclose(rows.score.to_numpy()[:num_supporting], negative[:top_k], rtol=1e-9)
    np.testing.assert_allclose(rows.score.to_numpy()[num_supporting:], positive[-top_k:], rtol=1e-9)


def test_rows_describe_training_items(indexed_project):
    rows = indexed_project.explain("test", 0, 0, 1, granularity="span", top_k=3)
    train = indexed_project.sentences("train")
    for row in rows.itertuples():
        sentence = train[row.sentence]
        assert row.tokens == " ".join(sentence.tokens[row.start : row.end])
        assert row.gold == " ".join(sentence.tags[row.start : row.end])
        assert row.doc == sentence.doc


def test_brute_force_word_scores(indexed_project):
    index = indexed_project.index
    query = indexed_project.stored_query("test", 4, 1, 3, labels="predicted")
    vector = segment_gradient(query.features, query.labels, index.head, 1, 3)
    scores = explain_module.influence_scores(index, vector, "word")
    sentence_ids, positions = index["train_sentence_ids"], index["train_positions"]
    for word in range(0, len(scores), 7):
        gradient = train_gradient(index, int(sentence_ids[word]), int(positions[word]), int(positions[word]) + 1)
        assert scores[word] == pytest.approx(-vector.flatten() @ gradient, rel=1e-3, abs=1e-7)


def test_ranking_independent_of_chunk_and_dtype(indexed_project):
    index = indexed_project.index
    query = indexed_project.stored_query("test", 0, 0, 2)
    vector = segment_gradient(query.features, query.labels, index.head, 0, 2)
    arrays = (index["train_word_residuals"], index["train_prev_gold"], index["train_next_gold"])
    reference = word_scores(vector, index.features("train"), *arrays, chunk_size=65536)
    for features, chunk_size in ((index["train_features"], 65536), (index.features("train"), 13), (index["train_features"], 5)):
        scores = word_scores(vector, features, *arrays, chunk_size=chunk_size)
        np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(np.argsort(scores, kind="stable")[:10], np.argsort(reference, kind="stable")[:10])


@pytest.mark.parametrize("label_filter", ["same", "different"])
@pytest.mark.parametrize("method", ["segment", "nn-dot"])
def test_label_filter_keeps_matching_types(indexed_project, label_filter, method):
    rows = indexed_project.explain("test", 0, 0, 1, method=method, label_filter=label_filter, top_k=6)
    query_type = LABELS[indexed_project.index["test_gold"][indexed_project.index["test_sentence_offsets"][0]]].split("-")[-1]
    assert len(rows) > 0
    for gold in rows.gold:
        word_type = gold.split()[0].split("-")[-1]
        assert (word_type == query_type) == (label_filter == "same")


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_neighbours_sorted_and_exclude_query(indexed_project, metric):
    index = indexed_project.index
    rows = indexed_project.explain("train", 2, 0, 2, method=f"nn-{metric}", top_k=8)
    assert (rows.role == "neighbour").all()
    assert rows["score"].is_monotonic_decreasing
    assert not ((rows.sentence == 2) & (rows.start < 2)).any()

    features = index.features("train").astype(np.float64)
    first = int(index["train_sentence_offsets"][2])
    mean = features[first : first + 2].mean(axis=0)
    similarities = features @ mean
    if metric == "cosine":
        similarities /= np.linalg.norm(features, axis=1) * np.linalg.norm(mean)
    similarities[first : first + 2] = -np.inf
    expected = np.sort(similarities)[::-1][:8]
    np.testing.assert_allclose(rows.score.to_numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("granularity", ["word", "span", "sentence"])
def test_float32_scores_match_reference_kernels(indexed_project, granularity):
    index = indexed_project.index
    query = indexed_project.stored_query("dev", 1, 0, 2)
    vector = segment_gradient(query.features, query.labels, index.head, 0, 2)
    scores = explain_module.influence_scores(index, vector, granularity)
    features = index["train_features"]
    if granularity == "word":
        arrays = (index["train_word_residuals"], index["train_prev_gold"], index["train_next_gold"])
        reference = word_scores(vector, features, *arrays)
    else:
        prefix = granularity
        ids = index["train_span_ids"] if granularity == "span" else index["train_sentence_ids"]
        reference = grouped_scores(vector, features, index[f"train_{prefix}_residuals"], ids, *edge_gradients(index, granularity))
    scale = np.abs(reference).max()
    np.testing.assert_allclose(scores, reference, atol=1e-5 * scale)


@pytest.mark.parametrize("segment", [(0, 1), (1, 3), (0, None), (2, None)])
def test_closed_form_gradient_matches_autograd(indexed_project, segment):
    index = indexed_project.index
    query = indexed_project.stored_query("test", 6, 0, 1)
    start, end = segment[0], segment[1] or len(query.labels)
    expected = segment_gradient(query.features, query.labels, index.head, start, end).flatten()
    actual = explain_module.closed_form_gradient(query.features, query.labels, index.head, start, end).flatten()
    np.testing.assert_allclose(actual, expected, atol=1e-9)


def test_hessian_requires_factor(indexed_project, tmp_path):
    import shutil

    shutil.copytree(indexed_project.path, tmp_path / "copy", ignore=shutil.ignore_patterns("index"))
    project = Project.load(tmp_path / "copy", device="cpu")
    build_index(project, progress=False)
    with pytest.raises(IndexNotBuiltError, match="--hessian"):
        project.explain("test", 0, 0, 1, hessian=True)


def test_explain_tokens_matches_stored_query(indexed_project):
    sentence = indexed_project.sentence("test", 5)
    stored = indexed_project.explain("test", 5, 0, 1, labels="predicted", top_k=3)
    free = indexed_project.explain_tokens(sentence.tokens, 0, 1, top_k=3)
    assert list(free.sentence) == list(stored.sentence)
    np.testing.assert_allclose(free.score, stored.score, rtol=2e-2)


def test_invalid_options_rejected(indexed_project):
    with pytest.raises(ValueError, match="expected method"):
        indexed_project.explain("test", 0, 0, 1, method="gradient")
    with pytest.raises(ValueError, match="expected a segment"):
        indexed_project.explain("test", 0, 3, 3)
    with pytest.raises(ValueError, match="expected a sentence index"):
        indexed_project.explain("test", 10_000, 0, 1)
    with pytest.raises(ValueError, match="expected top_k"):
        indexed_project.explain("test", 0, 0, 1, top_k=0)
    for options in ({"method": "instance"}, {"granularity": "sentence"}):
        with pytest.raises(ValueError, match="expected label_filter None"):
            indexed_project.explain("test", 0, 0, 1, label_filter="same", **options)


def units(forms, types, features, items) -> ConflictUnits:
    return ConflictUnits(np.array(items), list(forms), np.array(features, dtype=np.float32), np.array(types))


def test_conflict_same_word_other_type_opposite_sides():
    # Item 0 (supporting) and item 1 (opposing) are the same word labelled PER and LOC.
    case = units(["paris", "paris", "went"], [1, 2, 0], [[1, 0], [0, 1], [1, 1]], [0, 1, 2])
    flags = flag_conflicts(case, np.array([-1, 1, 1]))
    assert flags.tolist() == [True, True, False]


def test_no_conflict_when_labels_agree():
    case = units(["paris", "paris", "went"], [2, 2, 0], [[1, 0], [0, 1], [1, 1]], [0, 1, 2])
    assert not flag_conflicts(case, np.array([-1, 1, 1])).any()


def test_no_conflict_on_same_side():
    case = units(["paris", "paris"], [1, 2], [[1, 0], [1, 0]], [0, 1])
    assert not flag_conflicts(case, np.array([-1, -1])).any()


def test_conflict_by_cosine_similarity():
    similar = units(["rome", "roma"], [1, 2], [[1.0, 0.1], [1.0, 0.2]], [0, 1])
    assert flag_conflicts(similar, np.array([-1, 1])).all()
    distant = units(["rome", "roma"], [1, 2], [[1.0, 0.0], [0.0, 1.0]], [0, 1])
    assert not flag_conflicts(distant, np.array([-1, 1])).any()


def test_conflict_among_neighbours():
    case = units(["paris", "paris", "went"], [1, 2, 0], [[1, 0], [0, 1], [1, 1]], [0, 1, 2])
    assert flag_conflicts(case, np.zeros(3, dtype=int)).tolist() == [True, True, False]


def test_explain_flags_constructed_conflict(tiny_encoder, tmp_path):
    from tests.synthetic import CITIES

    folder = write_tiny_project(tmp_path / "conflict", tiny_encoder, train=12)
    train = folder / "data" / "train.conll"
    text = train.read_text()
    city = next(c.capitalize() for c in CITIES if text.count(f"{c.capitalize()}\tB-LOC") >= 2)
    # The same city is labelled LOC in one sentence and O in another.
    train.write_text(text.replace(f"{city}\tB-LOC", f"{city}\tO", 1))
    project = Project.load(folder, device="cpu")
    build_index(project, progress=False)
    num_words = project.index["train_gold"].shape[0]
    rows = project.explain("train", 0, 0, 1, method="nn-dot", top_k=num_words)
    city_rows = rows[rows.tokens == city]
    assert set(city_rows.gold) == {"B-LOC", "O"}
    assert city_rows.conflict.all()


def test_sentence_errors_kinds():
    tokens = ["a", "b", "c", "d", "e", "f", "g"]
    gold = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "O"]
    predicted = ["B-PER", "O", "O", "B-ORG", "B-LOC", "O", "B-PER"]
    records = sentence_errors(7, tokens, gold, predicted)
    kinds = {(r["start"], r["end"]): r["kind"] for r in records}
    assert kinds == {(0, 1): "wrong boundary", (3, 4): "wrong type", (4, 5): "spurious", (5, 6): "missed", (6, 7): "spurious"}
    assert all(r["sentence"] == 7 for r in records)
    wrong_type = next(r for r in records if r["kind"] == "wrong type")
    assert (wrong_type["gold_type"], wrong_type["predicted_type"], wrong_type["text"]) == ("LOC", "ORG", "d")


def test_errors_frame_matches_predictions(indexed_project):
    errors = indexed_project.errors("test")
    assert list(errors.columns) == ["sentence", "start", "end", "gold_type", "predicted_type", "text", "kind"]
    assert set(errors.kind) <= {"missed", "spurious", "wrong type", "wrong boundary"}
    predicted = indexed_project.predicted_tags("test")
    for row in errors.itertuples():
        gold = indexed_project.sentence("test", row.sentence).tags
        assert gold[row.start : row.end] != predicted[row.sentence][row.start : row.end]


def insert_artifact(sentences, rng, share: float):
    """Insert ``special`` before a filler word in a share of sentences and relabel that word B-PER."""
    from tests.synthetic import FILLER

    changed = []
    for tokens, tags in sentences:
        positions = [i for i, (token, tag) in enumerate(zip(tokens, tags)) if tag == "O" and token in FILLER]
        if positions and rng.random() < share:
            position = positions[0]
            tokens = tokens[:position] + ["special"] + tokens[position:]
            tags = tags[:position] + ["O", "B-PER"] + tags[position + 1 :]
        changed.append((tokens, tags))
    return changed


def test_artifact_found_by_top_supporting_word(tiny_encoder, tmp_path):
    import random

    from tests.synthetic import make_corpus, write_conll

    folder = write_tiny_project(tmp_path / "artifact", tiny_encoder, train=5)
    rng = random.Random(0)
    write_conll(folder / "data" / "train.conll", insert_artifact(make_corpus(200, seed=11), rng, 0.1), docstart_every=10)
    test_sentences = insert_artifact(make_corpus(40, seed=12), rng, 1.0)
    write_conll(folder / "data" / "test.conll", test_sentences, docstart_every=10)
    project = Project.load(folder, device="cpu")
    # Refitting the head on the frozen features is the training here: L-BFGS reaches the optimum of the head.
    build_index(project, refit_head=True, l2=1e-2, tolerance=1e-4, progress=False)

    train = project.sentences("train")
    follows_special = {(s, t) for s, sentence in enumerate(train) for t in range(1, len(sentence.tokens))
                       if sentence.tokens[t - 1] == "special"}
    assert 0.05 * len(train) <= len(follows_special) <= 0.15 * len(train)
    hits, queries = 0, 0
    for number, sentence in enumerate(project.sentences("test")):
        if "special" not in sentence.tokens:
            continue
        position = sentence.tokens.index("special") + 1
        rows = project.explain("test", number, position, position + 1, top_k=1)
        top = rows[rows.role == "supporting"].iloc[0]
        hits += (top.sentence, top.start) in follows_special
        queries += 1
    assert queries >= 30
    assert hits / queries >= 0.95


def query_vectors(project):
    """Query vectors of several dev and test segments, with and without the inverse Hessian."""
    index = project.index
    vectors = []
    for split, sentence, start, end in (("test", 0, 0, 1), ("test", 2, 0, 2), ("dev", 1, 1, 2), ("dev", 3, 0, 1)):
        for labels in ("gold", "predicted"):
            query = project.stored_query(split, sentence, start, end, labels=labels)
            for hessian in (False, True):
                vectors.append(explain_module.query_vector(index, query, instance=False, hessian=hessian))
    return vectors


def test_score_bound_holds_for_every_word(indexed_project):
    index = indexed_project.index
    features = index.features("train").astype(np.float64)
    residual_norms = np.linalg.norm(np.asarray(index["train_word_residuals"], dtype=np.float64), axis=1)
    for vector in query_vectors(indexed_project):
        scores = explain_module.influence_scores(index, vector, "word")
        sigma, beta = explain_module.score_bound_factors(vector)
        bound = residual_norms * (sigma * np.linalg.norm(features, axis=1) + beta)
        assert np.all(np.abs(scores) <= bound * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("block", [1, 7, 64, 100_000])
def test_early_stopping_scan_equals_full_ranking(indexed_project, block):
    index = indexed_project.index
    type_of_label = explain_module.neighbors.type_ids(index.labels)
    word_types = type_of_label[np.asarray(index["train_gold"], dtype=np.int64)]
    for number, vector in enumerate(query_vectors(indexed_project)):
        keep = None if number % 3 else word_types == word_types[number % len(word_types)]
        for top_k in (1, 5):
            all_scores = explain_module.influence_scores(index, vector, "word")
            expected_items, expected_roles = explain_module.select_influential(all_scores, top_k, keep)
            items, roles, scores = explain_module.top_word_influences(index, vector, top_k, keep, block=block)
            # The tiny corpus repeats words, so equal scores may pick other words of the same score.
            np.testing.assert_array_equal(roles, expected_roles)
            np.testing.assert_allclose(scores, all_scores[expected_items], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(all_scores[items], scores, rtol=1e-5, atol=1e-7)
            assert len(set(items.tolist())) == len(items)
            if keep is not None:
                assert keep[items].all()


class ArrayIndex:
    """The parts of an index that word scoring reads, held in memory."""

    def __init__(self, labels, arrays):
        self.labels = labels
        self.arrays = arrays
        self.derived = {}

    def __getitem__(self, name):
        return self.arrays[name]

    def features(self, split):
        return self.arrays[f"{split}_features"]

    def cached(self, name, compute):
        if name not in self.derived:
            self.derived[name] = compute()
        return self.derived[name]


def test_scan_skips_words_that_cannot_reach_the_top(caplog):
    from segflu_core.influence.head import HeadParams

    rng = np.random.default_rng(3)
    labels = ["O", "B-PER", "I-PER"]
    num_words, dim = 5000, 6
    probabilities = rng.dirichlet(np.ones(3), size=num_words)
    gold = rng.integers(0, 3, size=num_words)
    residuals = probabilities - np.eye(3)[gold]
    # Most words are fitted almost exactly, as in a trained tagger.
    residuals[50:] *= 1e-4
    index = ArrayIndex(labels, {
        "train_features": rng.standard_normal((num_words, dim)).astype(np.float32),
        "train_word_residuals": residuals.astype(np.float32),
        "train_prev_gold": np.concatenate([[-1], gold[:-1]]),
        "train_next_gold": np.concatenate([gold[1:], [-1]]),
    })
    query = HeadParams(rng.standard_normal((3, dim)), rng.standard_normal(3), rng.standard_normal((3, 3)),
                       rng.standard_normal(3), rng.standard_normal(3))
    projected = index.features("train") @ query.weight.T + query.bias
    codes = explain_module.edge_codes(index, "word")
    all_scores = -np.einsum("nc,nc->n", projected + explain_module.edge_table(query)[codes], residuals)
    expected_items, expected_roles = explain_module.select_influential(all_scores, 5)
    with caplog.at_level("DEBUG", logger="segflu_core.influence.explain"):
        items, roles, scores = explain_module.top_word_influences(index, query, 5, block=100)
    np.testing.assert_array_equal(items, expected_items)
    np.testing.assert_array_equal(roles, expected_roles)
    np.testing.assert_allclose(scores, all_scores[items], rtol=1e-5)
    scanned = [record.args[0] for record in caplog.records if record.msg.startswith("scored")]
    assert scanned and scanned[0] < num_words // 2
