"""Retraining on corrected labels: the refitted head learns a consistent relabel, and the old model is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segflu_core.correction import PREVIOUS_METRICS_FILE, PREVIOUS_MODEL_FOLDER, entity_correct, retrain, stored_predictions
from segflu_core.edits import EditStore
from segflu_core.influence.index import build_index
from segflu_core.project import EDITS_FILE, Project
from segflu_core.tagger import Tagger, write_json
from tests.test_index import write_tiny_project

# Sentence-final "." has features the tiny random encoder separates from every other word.
WORD = "."


def relabel_word(project: Project, word: str, label: str) -> list[tuple[int, int]]:
    """Relabel every training occurrence of ``word`` as a one-word entity; return (sentence, position) pairs."""
    store = EditStore(project.path / EDITS_FILE)
    positions = []
    for number in range(len(project.sentences("train"))):
        for position, token in enumerate(project.sentence("train", number).tokens):
            if token.lower() == word:
                tags = project.sentence("train", number).tags
                store.relabel("train", number, position, position + 1, label, current_tags=tags)
                positions.append((number, position))
    return positions


@pytest.fixture(scope="module")
def retrained(tiny_encoder, tmp_path_factory):
    folder = write_tiny_project(tmp_path_factory.mktemp("retrain") / "tiny", tiny_encoder, train=30)
    project = Project.load(folder, device="cpu")
    build_index(project, progress=False)
    write_json(folder / "metrics.json", {"dev": {"marker": True}})
    old_weight = np.load(folder / "index" / "head_weight.npy")
    positions = relabel_word(project, WORD, "LOC")
    predicted_before = [project.predict(project.sentence("train", s).tokens)[p] for s, p in positions]
    sentence, position = positions[0]
    result = retrain(folder, mode="head", query=("train", sentence, position, position + 1))
    return folder, positions, predicted_before, old_weight, result


def test_relabelled_word_predicted(retrained):
    folder, positions, predicted_before, _old_weight, _result = retrained
    assert len(positions) >= 5
    assert predicted_before.count("B-LOC") < len(positions)
    project = Project.load(folder, device="cpu")
    predicted = [project.predict(project.sentence("train", s).tokens)[p] for s, p in positions]
    assert predicted == ["B-LOC"] * len(positions)


def test_previous_model_kept(retrained):
    folder, _positions, _predicted_before, old_weight, _result = retrained
    previous_weight = Tagger.load(folder / PREVIOUS_MODEL_FOLDER, device="cpu").emission.weight.detach().double().numpy()
    np.testing.assert_allclose(previous_weight, old_weight, atol=1e-6)
    assert json.loads((folder / PREVIOUS_METRICS_FILE).read_text()) == {"dev": {"marker": True}}
    assert (folder / "model").is_dir()


def test_index_rebuilt_with_new_head(retrained):
    folder, _positions, _predicted_before, old_weight, _result = retrained
    project = Project.load(folder, device="cpu")
    new_weight = np.load(folder / "index" / "head_weight.npy")
    assert not np.allclose(new_weight, old_weight)
    np.testing.assert_allclose(new_weight, project.tagger.emission.weight.detach().double().numpy(), atol=1e-6)
    gold = [project.labels[i] for i in np.load(folder / "index" / "train_gold.npy")]
    assert gold == [tag for sentence in project.sentences("train") for tag in sentence.tags]


def test_metrics_before_and_after(retrained):
    folder, _positions, _predicted_before, _old_weight, result = retrained
    for split in ("dev", "test"):
        for side in ("before", "after"):
            assert set(result[side][split]) >= {"per_type", "micro", "macro"}, (side, split)
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(result["after"]))


def test_query_before_and_after(retrained):
    _folder, _positions, predicted_before, _old_weight, result = retrained
    query = result["query"]
    assert query["gold"] == ["B-LOC"]
    assert query["correct_after"] is True
    assert query["correct_before"] is (predicted_before[0] == "B-LOC")


def test_entity_correct_cases():
    gold = ["B-PER", "I-PER", "O", "B-LOC"]
    assert entity_correct(gold, list(gold), 0, 2)
    assert not entity_correct(gold, ["B-PER", "O", "O", "B-LOC"], 0, 2)
    assert not entity_correct(gold, ["B-ORG", "I-ORG", "O", "B-LOC"], 0, 2)
    assert not entity_correct(["O", "B-LOC", "O"], ["O", "B-LOC", "I-LOC"], 1, 2)
    assert entity_correct(gold, ["B-ORG", "I-ORG", "O", "B-LOC"], 2, 3)


def test_unknown_mode_rejected(tmp_path):
    with pytest.raises(ValueError, match="expected mode"):
        retrain(tmp_path, mode="encoder")


def test_full_retrain_uses_edited_labels(tiny_encoder, tmp_path):
    from segflu_core.training import TrainConfig

    folder = write_tiny_project(tmp_path / "full", tiny_encoder, train=12)
    project = Project.load(folder, device="cpu")
    old_weight = project.tagger.emission.weight.detach().double().numpy()
    positions = relabel_word(project, WORD, "LOC")
    config = TrainConfig(freeze_encoder=True, head_epochs=2, batch_size=8, device="cpu")
    result = retrain(folder, mode="full", config=config)
    assert len(result["training"]) == 2
    previous_weight = Tagger.load(folder / PREVIOUS_MODEL_FOLDER, device="cpu").emission.weight.detach().double().numpy()
    np.testing.assert_allclose(previous_weight, old_weight)
    reopened = Project.load(folder, device="cpu")
    new_weight = reopened.tagger.emission.weight.detach().double().numpy()
    np.testing.assert_allclose(np.load(folder / "index" / "head_weight.npy"), new_weight, atol=1e-6)
    gold = np.load(folder / "index" / "train_gold.npy")
    offsets = np.load(folder / "index" / "train_sentence_offsets.npy")
    for sentence, position in positions:
        assert reopened.labels[gold[offsets[sentence] + position]] == "B-LOC"


def test_stored_predictions_match_index(retrained):
    folder = retrained[0]
    index = Project.load(folder, device="cpu").index
    predicted = stored_predictions(index, "dev", index.head)
    flat = [tag for tags in predicted for tag in tags]
    assert flat == [index.labels[i] for i in index["dev_predictions"]]
    assert stored_predictions(index, "dev", index.head, sentences=[2, 0]) == [predicted[2], predicted[0]]
