"""Word features saved at frozen training and reused by the index builder."""

from __future__ import annotations

import numpy as np
import pytest

from segflu_core.feature_cache import FEATURES_FOLDER, load_features, tokens_digest
from segflu_core.influence.index import build_index
from segflu_core.project import Project
from segflu_core.training import TrainConfig, train_project
from tests.synthetic import make_corpus, write_conll


@pytest.fixture(scope="module")
def frozen_project(tmp_path_factory, tiny_encoder):
    folder = tmp_path_factory.mktemp("frozen-cache")
    train = write_conll(folder / "train.conll", make_corpus(40, seed=1))
    dev = write_conll(folder / "dev.conll", make_corpus(10, seed=2))
    test = write_conll(folder / "test.conll", make_corpus(10, seed=3))
    config = TrainConfig(freeze_encoder=True, head_epochs=2, batch_size=8)
    train_project(train, dev, test, folder / "project", encoder=str(tiny_encoder), config=config, progress=False)
    return folder / "project"


def test_saved_features_equal_encoder_output(frozen_project):
    project = Project.load(frozen_project)
    for split in ("train", "dev", "test"):
        token_lists = [sentence.tokens for sentence in project.sentences(split)]
        saved = load_features(frozen_project, split, token_lists, project.tagger)
        assert saved is not None
        computed = np.concatenate(project.tagger.word_features(token_lists, progress=False))
        np.testing.assert_array_equal(saved, computed.astype(np.float16))


def test_saved_features_rejected_for_other_tokens(frozen_project):
    project = Project.load(frozen_project)
    token_lists = [sentence.tokens for sentence in project.sentences("dev")]
    changed = [list(tokens) for tokens in token_lists]
    changed[0][0] = changed[0][0] + "x"
    assert tokens_digest(changed) != tokens_digest(token_lists)
    assert load_features(frozen_project, "dev", changed, project.tagger) is None


def test_index_from_saved_features_equals_recomputed(frozen_project, tmp_path, monkeypatch):
    from segflu_core.tagger import Tagger

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although saved features apply")

    with monkeypatch.context() as patch:
        patch.setattr(Tagger, "_encode_words", no_encoder)
        build_index(Project.load(frozen_project), progress=False)
    reused = np.load(frozen_project / "index" / "train_features.npy")
    reused_residuals = np.load(frozen_project / "index" / "train_word_residuals.npy")

    (frozen_project / FEATURES_FOLDER / "manifest.json").rename(tmp_path / "manifest.json")
    try:
        build_index(Project.load(frozen_project), progress=False)
    finally:
        (tmp_path / "manifest.json").rename(frozen_project / FEATURES_FOLDER / "manifest.json")
    recomputed = np.load(frozen_project / "index" / "train_features.npy")
    np.testing.assert_array_equal(reused, recomputed)
    np.testing.assert_array_equal(reused_residuals, np.load(frozen_project / "index" / "train_word_residuals.npy"))


def test_cache_rejected_for_fine_tuned_tagger(tiny_encoder):
    from segflu_core.tagger import Tagger

    tagger = Tagger.create(["O", "B-PER", "I-PER"], encoder=str(tiny_encoder), fine_tune_encoder=True)
    with pytest.raises(ValueError, match="frozen encoder"):
        tagger.enable_feature_cache()


def test_cached_predictions_equal_uncached(tiny_encoder):
    from segflu_core.tagger import Tagger

    tagger = Tagger.create(["O", "B-PER", "I-PER"], encoder=str(tiny_encoder), fine_tune_encoder=False)
    token_lists = [tokens for tokens, _ in make_corpus(12, seed=4)]
    plain = tagger.predict(token_lists)
    tagger.enable_feature_cache()
    assert tagger.predict(token_lists) == plain
    assert tagger.predict(token_lists) == plain
