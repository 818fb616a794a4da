"""Tests of the tagger: emissions, loss, constrained decoding, features and save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segflu_core.errors import ProjectError
from segflu_core.schemes import allowed_transitions, label_list
from segflu_core.tagger import Tagger, pad_features, resolve_device
from tests.synthetic import make_corpus

LABELS = label_list(["LOC", "ORG", "PER"])


@pytest.fixture(scope="module")
def tagger(tiny_encoder) -> Tagger:
    torch.manual_seed(0)
    model = Tagger.create(LABELS, encoder=tiny_encoder)
    # Random emissions and transitions, so that decoding has real choices to make.
    with torch.no_grad():
        model.emission.weight.normal_(std=1.0)
        model.crf.transitions.normal_(std=1.0)
        model.crf.start_transitions.normal_(std=1.0)
        model.crf.end_transitions.normal_(std=1.0)
    return model.eval()


def test_emissions_are_linear_in_features(tagger):
    tokens = [make_corpus(3)[i][0] for i in range(3)]
    features, mask = tagger.forward_features(tokens)
    emissions = tagger.emissions(features)
    assert emissions.shape == (3, features.shape[1], len(LABELS))
    expected = features @ tagger.emission.weight.T + tagger.emission.bias
    assert torch.allclose(emissions, expected, atol=1e-5)


def test_loss_is_negative_crf_log_likelihood(tagger):
    corpus = make_corpus(4, seed=1)
    tokens = [pair[0] for pair in corpus]
    features, mask = tagger.forward_features(tokens)
    tag_ids = torch.zeros(mask.shape, dtype=torch.long)
    for row, (_, tags) in enumerate(corpus):
        tag_ids[row, : len(tags)] = torch.tensor([LABELS.index(tag) for tag in tags])
    loss = tagger.loss(tokens, tag_ids, mask)
    expected = -tagger.crf(tagger.emissions(features), tag_ids, mask, reduction="mean")
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="mask of shape"):
        tagger.loss(tokens, tag_ids[:, :2], mask[:, :2])


def brute_force_best(emissions: torch.Tensor, tagger: Tagger) -> list[int]:
    """Highest-scoring allowed tag sequence by enumeration; ``emissions`` is ``(seq_len, C)``."""
    start, allowed, end = (torch.from_numpy(a) for a in allowed_transitions(LABELS))
    best_score, best_path = -float("inf"), None
    num_tags = len(LABELS)
    length = emissions.shape[0]
    for code in range(num_tags**length):
        path = [(code // num_tags**position) % num_tags for position in range(length)]
        if not start[path[0]] or not end[path[-1]]:
            continue
        if any(not allowed[a, b] for a, b in zip(path, path[1:])):
            continue
        with torch.no_grad():
            score = tagger.crf.start_transitions[path[0]] + tagger.crf.end_transitions[path[-1]]
            score = score + sum(emissions[i, tag] for i, tag in enumerate(path))
            score = score + sum(tagger.crf.transitions[a, b] for a, b in zip(path, path[1:]))
        if score > best_score:
            best_score, best_path = float(score), path
    return best_path


def test_predict_matches_brute_force(tagger):
    sentences = [["john", "went", "to"], ["paris"], ["acme", "said", "rome", "."]]
    predicted = tagger.predict(sentences, batch_size=2)
    with torch.no_grad():
        features, mask = tagger.forward_features(sentences)
        emissions = tagger.emissions(features)
    for row, tokens in enumerate(sentences):
        best = brute_force_best(emissions[row, : len(tokens)], tagger)
        assert predicted[row] == [LABELS[tag] for tag in best]


def test_predict_never_puts_inside_after_outside(tagger):
    with torch.no_grad():
        # Emissions that favour I-PER everywhere: unconstrained Viterbi would output it first.
        tagger.emission.bias[LABELS.index("I-PER")] += 50.0
    try:
        predicted = tagger.predict([pair[0] for pair in make_corpus(10, seed=2)])
    finally:
        with torch.no_grad():
            tagger.emission.bias[LABELS.index("I-PER")] -= 50.0
    for tags in predicted:
        for previous, tag in zip(["O"] + tags, tags):
            if tag.startswith("I-"):
                assert previous[2:] == tag[2:], tags


def test_predict_keeps_order_and_empty_sentences(tagger):
    sentences = [pair[0] for pair in make_corpus(7, seed=3)]
    sentences.insert(2, [])
    batched = tagger.predict(sentences, batch_size=3)
    one_by_one = [tagger.predict([tokens])[0] for tokens in sentences]
    assert batched == one_by_one
    assert batched[2] == []
    assert [len(tags) for tags in batched] == [len(tokens) for tokens in sentences]


def test_word_features_match_forward(tagger):
    sentences = [pair[0] for pair in make_corpus(5, seed=4)] + [[]]
    arrays = tagger.word_features(sentences, batch_size=2, progress=False)
    assert [array.shape for array in arrays] == [(len(s), tagger.encoder.feature_dim) for s in sentences]
    assert all(array.dtype == np.float32 for array in arrays)
    with torch.no_grad():
        features, _ = tagger.forward_features(sentences[:1])
    assert np.allclose(arrays[0], features[0].numpy(), atol=1e-5)

    padded, mask = pad_features(arrays)
    assert padded.shape == (6, max(len(s) for s in sentences), tagger.encoder.feature_dim)
    assert mask.sum(dim=1).tolist() == [len(s) for s in sentences]


def test_save_load_round_trip(tagger, tmp_path):
    sentences = [pair[0] for pair in make_corpus(6, seed=5)]
    tagger.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json",
        "encoder",
        "head.safetensors",
        "labels.json",
    ]
    assert (tmp_path / "model" / "encoder" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "model" / "labels.json").read_text()) == LABELS
    loaded = Tagger.load(tmp_path / "model")
    assert loaded.predict(sentences) == tagger.predict(sentences)
    for name, tensor in tagger.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.encoder_origin == tagger.encoder_origin


def test_frozen_tagger_saves_head_only(tiny_encoder, tmp_path):
    frozen = Tagger.create(LABELS, encoder=tiny_encoder, fine_tune_encoder=False)
    frozen.save(tmp_path / "model")
    assert not (tmp_path / "model" / "encoder").exists()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["encoder_fine_tuned"] is False
    assert config["encoder"] == str(tiny_encoder.resolve())
    loaded = Tagger.load(tmp_path / "model")
    sentences = [pair[0] for pair in make_corpus(4, seed=6)]
    assert loaded.predict(sentences) == frozen.predict(sentences)


def test_load_reports_missing_head(tagger, tmp_path):
    tagger.save(tmp_path / "model")
    (tmp_path / "model" / "head.safetensors").unlink()
    with pytest.raises(ProjectError, match="head.safetensors"):
        Tagger.load(tmp_path / "model")
    with pytest.raises(ProjectError, match="config.json"):
        Tagger.load(tmp_path / "missing")


def test_labels_checked(tiny_encoder):
    with pytest.raises(ValueError, match="'O' first"):
        Tagger.create(["B-PER", "O"], encoder=tiny_encoder)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="expected device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_case_embeddings_survive_save_and_load(tiny_encoder, tmp_path):
    sentences = [pair[0] for pair in make_corpus(4, seed=7)]
    cased = Tagger.create(LABELS, encoder=tiny_encoder, case_embeddings=True)
    with torch.no_grad():
        cased.encoder.model.embeddings.token_type_embeddings.weight.normal_()
    cased.eval()
    cased.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["case_embeddings"] is True
    loaded = Tagger.load(tmp_path / "model")
    assert loaded.encoder.case_embeddings
    for name, tensor in cased.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        expected, _ = cased.forward_features(sentences)
        actual, _ = loaded.forward_features(sentences)
    assert torch.allclose(actual, expected, atol=1e-6)
