"""Noise ranking: factor-based scores against autograd gradients and brute-force aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segflu_core.influence import noise
from segflu_core.influence.neighbors import type_ids
from segflu_core.influence.scores import segment_gradient
from segflu_core.project import DEFAULT_CLEAN_DOCUMENTS
from tests.test_index import LABELS, indexed_project, sentence_arrays  # noqa: F401


def word_gradient(index, split: str, sentence: int, position: int) -> np.ndarray:
    features, labels = sentence_arrays(index, split, sentence)
    return segment_gradient(features, labels, index.head, position, position + 1).flatten()


def train_word_location(index, word: int) -> tuple[int, int]:
    return int(index["train_sentence_ids"][word]), int(index["train_positions"][word])


def clean_validation(project, docs=(0, 1)) -> noise.ValidationWords:
    documents = project.corpus("dev").documents
    sentences = [s for doc in docs for s in documents[doc]]
    return noise.validation_from_index(project.index, "dev", sentences), sentences


def validation_gradients(project, sentences) -> np.ndarray:
    index = project.index
    gradients = []
    for sentence in sentences:
        length = len(sentence_arrays(index, "dev", sentence)[1])
        gradients.extend(word_gradient(index, "dev", sentence, t) for t in range(length))
    return np.array(gradients)


def test_grad_norm_matches_autograd(indexed_project):
    index = indexed_project.index
    arrays = (index["train_word_residuals"], index["train_prev_gold"], index["train_next_gold"])
    norms = noise.word_gradient_norms(index.features("train"), *arrays)
    for word in range(0, len(norms), 11):
        expected = np.linalg.norm(word_gradient(index, "train", *train_word_location(index, word)))
        assert norms[word] == pytest.approx(expected, rel=1e-4)


def test_gram_matches_gradient_dot_products(indexed_project):
    index = indexed_project.index
    validation, sentences = clean_validation(indexed_project)
    validation_matrix = validation_gradients(indexed_project, sentences)
    words = np.arange(0, 60, 3)
    block = (
        index.features("train")[words],
        index["train_word_residuals"][words],
        np.asarray(index["train_prev_gold"][words], dtype=np.int64),
        np.asarray(index["train_next_gold"][words], dtype=np.int64),
    )
    gram = noise.word_gradient_gram(block, validation)
    train_matrix = np.array([word_gradient(index, "train", *train_word_location(index, w)) for w in words])
    np.testing.assert_allclose(gram, train_matrix @ validation_matrix.T, rtol=1e-3, atol=1e-5)


def test_segment_influence_scores_brute_force(indexed_project):
    index = indexed_project.index
    validation, sentences = clean_validation(indexed_project)
    validation_matrix = validation_gradients(indexed_project, sentences)
    scores = noise.segment_influence_scores(index, validation)
    for word in (0, 17, 40):
        influences = -validation_matrix @ word_gradient(index, "train", *train_word_location(index, word))
        expected = np.sort(influences)[-noise.TOP_VALUES :].mean()
        assert scores[word] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_instance_influence_scores_brute_force(indexed_project):
    index = indexed_project.index
    validation, sentences = clean_validation(indexed_project)
    scores = noise.instance_influence_scores(index, validation)
    query = []
    for sentence in sentences:
        features, labels = sentence_arrays(index, "dev", sentence)
        query.append(segment_gradient(features, labels, index.head, 0, len(labels)).flatten())
    mean_query = np.mean(query, axis=0)
    for sentence in (0, 9):
        features, labels = sentence_arrays(index, "train", sentence)
        gradient = segment_gradient(features, labels, index.head, 0, len(labels)).flatten()
        assert scores[sentence] == pytest.approx(-mean_query @ gradient, rel=1e-3, abs=1e-6)


def test_nearest_neighbour_scores_brute_force(indexed_project):
    index = indexed_project.index
    validation, _ = clean_validation(indexed_project)
    scores = noise.nearest_neighbour_scores(index, validation)
    types = type_ids(LABELS)
    features = index.features("train")
    for word in (2, 30):
        dots = validation.features @ features[word]
        other_type = types[validation.gold] != types[index["train_gold"][word]]
        expected = np.sort(dots[other_type])[-noise.TOP_VALUES :].mean()
        assert scores[word] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("method", ["word-loss", "sentence-loss", "entropy"])
def test_document_aggregation(indexed_project, method, aggregate):
    index = indexed_project.index
    ranking = indexed_project.rank_noise(method, aggregate=aggregate)
    train = indexed_project.sentences("train")
    if method == "sentence-loss":
        frame = pd.DataFrame({"doc": [s.doc for s in train], "score": index["train_sentence_loss"]})
    else:
        docs = np.array([s.doc for s in train])[index["train_sentence_ids"]]
        name = "train_word_loss" if method == "word-loss" else "train_entropy"
        frame = pd.DataFrame({"doc": docs, "score": index[name]})
    expected = frame.groupby("doc")["score"].agg(aggregate)
    assert list(ranking.columns) == noise.COLUMNS
    assert ranking["score"].is_monotonic_decreasing
    for row in ranking.itertuples():
        assert row.score == pytest.approx(expected[row.doc], rel=1e-5)
        assert all(train[s].doc == row.doc for s in row.sentences)
        assert row.first_tokens.split() == train[row.sentences[0]].tokens[: noise.FIRST_TOKENS]


def test_every_method_ranks_all_documents(indexed_project):
    num_documents = len(indexed_project.corpus("train").documents)
    for method in noise.METHODS:
        ranking = indexed_project.rank_noise(method)
        assert sorted(ranking.doc) == list(range(num_documents)), method
        assert np.isfinite(ranking.score).all(), method


def test_default_clean_documents(indexed_project):
    documents = indexed_project.corpus("dev").documents
    chosen = list(range(min(DEFAULT_CLEAN_DOCUMENTS, len(documents))))
    default = indexed_project.rank_noise("nn")
    explicit = indexed_project.rank_noise("nn", clean_docs=chosen)
    pd.testing.assert_frame_equal(default, explicit)


def test_clean_corpus_file_matches_index(indexed_project):
    path = indexed_project.data_path("dev")
    from_file = indexed_project.rank_noise("segment-influence", clean_docs=str(path))
    documents = indexed_project.corpus("dev").documents
    from_index = indexed_project.rank_noise("segment-influence", clean_docs=range(len(documents)))
    merged = from_file.merge(from_index, on="doc")
    # The file's features are float32 from the encoder, the index's are float16.
    np.testing.assert_allclose(merged.score_x, merged.score_y, rtol=2e-2, atol=1e-4)


def test_invalid_options_rejected(indexed_project):
    with pytest.raises(ValueError, match="expected method"):
        indexed_project.rank_noise("loss")
    with pytest.raises(ValueError, match="expected aggregate"):
        indexed_project.rank_noise("word-loss", aggregate="sum")
    with pytest.raises(ValueError, match="dev document indices"):
        indexed_project.rank_noise("nn", clean_docs=[10_000])


def test_file_without_docstart_ranks_sentences(tiny_encoder, tmp_path):
    from segflu_core.influence.index import build_index
    from segflu_core.project import Project
    from tests.synthetic import make_corpus, write_conll
    from tests.test_index import write_tiny_project

    folder = write_tiny_project(tmp_path / "tweets", tiny_encoder, train=15)
    write_conll(folder / "data" / "train.conll", make_corpus(15, seed=1))
    write_conll(folder / "data" / "dev.conll", make_corpus(12, seed=2))
    project = Project.load(folder, device="cpu")
    build_index(project, progress=False)
    assert len(project.documents("train")) == 1

    ranking = project.rank_noise("word-loss", aggregate="max")
    assert sorted(ranking.doc) == list(range(15))
    assert all(list(row.sentences) == [row.doc] for row in ranking.itertuples())
    word_loss = np.asarray(project.index["train_word_loss"])
    sentence_ids = np.asarray(project.index["train_sentence_ids"])
    expected = {sentence: word_loss[sentence_ids == sentence].max() for sentence in range(15)}
    for row in ranking.itertuples():
        assert row.score == pytest.approx(expected[row.doc], rel=1e-6)

    validation = project.clean_validation()
    dev_words = sum(len(sentence.tokens) for sentence in project.sentences("dev")[:DEFAULT_CLEAN_DOCUMENTS])
    assert len(validation.gold) == dev_words
