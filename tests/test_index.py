"""Influence index: stored arrays against direct recomputation with the CRF kernels and autograd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segflu_core import crf
from segflu_core.errors import IndexNotBuiltError, UnsafePathError
from segflu_core.influence import index as index_module
from segflu_core.influence.index import InfluenceIndex, build_index, edge_gradients
from segflu_core.influence.scores import segment_gradient
from segflu_core.project import Project
from segflu_core.schemes import label_list
from tests.synthetic import make_corpus, write_conll

LABELS = label_list(["LOC", "ORG", "PER"])


def write_tiny_project(folder: Path, encoder: Path, *, train: int = 40, seed: int = 0) -> Path:
    """Write a project folder with generated CoNLL data and a random tagger on ``encoder``."""
    from segflu_core.tagger import Tagger

    (folder / "data").mkdir(parents=True)
    write_conll(folder / "data" / "train.conll", make_corpus(train, seed=seed + 1), docstart_every=5)
    write_conll(folder / "data" / "dev.conll", make_corpus(12, seed=seed + 2), docstart_every=3)
    write_conll(folder / "data" / "test.conll", make_corpus(12, seed=seed + 3), docstart_every=3)
    torch.manual_seed(seed)
    tagger = Tagger.create(LABELS, encoder=str(encoder), fine_tune_encoder=False)
    with torch.no_grad():
        # Larger random head parameters make the marginals far from uniform.
        tagger.emission.weight.normal_(0.0, 0.5)
        tagger.crf.transitions.normal_(0.0, 0.5)
        tagger.crf.start_transitions.normal_(0.0, 0.5)
        tagger.crf.end_transitions.normal_(0.0, 0.5)
    tagger.save(folder / "model")
    data = {
        split: {"path": f"data/{split}.conll", "source": f"{split}.conll", "format": "conll",
                "tag_column": -1, "encoding": "utf-8", "scheme": "iob2"}
        for split in ("train", "dev", "test")
    }
    config = {"labels": LABELS, "encoder": str(encoder), "data": data}
    (folder / "project.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def indexed_project(tiny_encoder, tmp_path_factory) -> Project:
    """A tiny project with an index built with the Hessian, in small chunks."""
    folder = write_tiny_project(tmp_path_factory.mktemp("project") / "tiny", tiny_encoder)
    project = Project.load(folder, device="cpu")
    build_index(project, hessian=True, chunk_sentences=7, progress=False)
    return project


def sentence_arrays(index: InfluenceIndex, split: str, sentence: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = index[f"{split}_sentence_offsets"]
    rows = slice(offsets[sentence], offsets[sentence + 1])
    features = np.asarray(index[f"{split}_features"][rows], dtype=np.float32)
    return features, np.asarray(index[f"{split}_gold"][rows], dtype=np.int64)


def kernel_inputs(index: InfluenceIndex, features: np.ndarray, labels: np.ndarray):
    head = index.head
    emissions = torch.from_numpy(features.astype(np.float64) @ head.weight.T + head.bias)[None]
    tags = torch.from_numpy(labels)[None]
    mask = torch.ones_like(tags, dtype=torch.bool)
    parameters = tuple(torch.from_numpy(a) for a in (head.transitions, head.start, head.end))
    return emissions, tags, mask, parameters


def test_word_arrays_match_word_conditional(indexed_project):
    index = indexed_project.index
    offsets = index["train_sentence_offsets"]
    for sentence in (0, 3, 11):
        features, labels = sentence_arrays(index, "train", sentence)
        emissions, tags, mask, parameters = kernel_inputs(index, features, labels)
        expected = crf.word_conditional(emissions, tags, mask, *parameters)
        rows = slice(offsets[sentence], offsets[sentence + 1])
        np.testing.assert_allclose(index["train_word_residuals"][rows], expected.residuals[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(index["train_word_loss"][rows], -expected.log_likelihood[0].numpy(), rtol=1e-5, atol=1e-5)
        marginals = expected.marginals[0].numpy()
        entropy = -(marginals * np.log(marginals)).sum(1)
        np.testing.assert_allclose(index["train_entropy"][rows], entropy, rtol=1e-5, atol=1e-5)


def test_neighbour_labels_and_ids(indexed_project):
    index = indexed_project.index
    gold = np.asarray(index["train_gold"])
    sentence_ids = np.asarray(index["train_sentence_ids"])
    same_sentence_next = np.append(sentence_ids[1:] == sentence_ids[:-1], False)
    expected_next = np.where(same_sentence_next, np.append(gold[1:], -1), -1)
    np.testing.assert_array_equal(index["train_next_gold"], expected_next)
    same_sentence_previous = np.insert(sentence_ids[1:] == sentence_ids[:-1], 0, False)
    expected_previous = np.where(same_sentence_previous, np.insert(gold[:-1], 0, -1), -1)
    np.testing.assert_array_equal(index["train_prev_gold"], expected_previous)
    tags = [tag for sentence in indexed_project.sentences("train") for tag in sentence.tags]
    assert [LABELS[i] for i in gold] == tags


def test_span_arrays_match_autograd(indexed_project):
    index = indexed_project.index
    offsets = index["train_sentence_offsets"]
    span_sentence = np.asarray(index["train_span_sentence"])
    multi_word = np.flatnonzero(np.asarray(index["train_span_end"]) - np.asarray(index["train_span_start"]) > 1)
    np.testing.assert_array_equal(index["train_multiword_spans"], multi_word)
    assert index["train_span_transitions"].shape[0] == len(multi_word)
    last_words = np.flatnonzero(np.asarray(index["train_next_gold"]) == -1)
    ends_sentence = np.flatnonzero(np.isin(np.asarray(index["train_span_ids"])[last_words], multi_word))
    # Multi-word spans at both sentence edges and one-word spans at the first, second and last position.
    chosen = list(multi_word[:3]) + [0, 1, len(span_sentence) - 1]
    chosen += [int(index["train_span_ids"][last_words[ends_sentence[0]]])] if len(ends_sentence) else []
    transitions, start_gradient, end_gradient = edge_gradients(index, "span", chosen)
    for row, span in enumerate(chosen):
        sentence = int(span_sentence[span])
        start, end = int(index["train_span_start"][span]), int(index["train_span_end"][span])
        features, labels = sentence_arrays(index, "train", sentence)
        gradient = segment_gradient(features, labels, index.head, start, end)
        np.testing.assert_allclose(transitions[row], gradient.transitions, atol=1e-5)
        np.testing.assert_allclose(start_gradient[row], gradient.start, atol=1e-5)
        np.testing.assert_allclose(end_gradient[row], gradient.end, atol=1e-5)
        rows = slice(offsets[sentence], offsets[sentence + 1])
        residuals = np.asarray(index["train_span_residuals"][rows], dtype=np.float64)
        in_span = (np.asarray(index["train_span_ids"][rows]) == span)[:, None]
        weight_gradient = (residuals * in_span).T @ features.astype(np.float64)
        np.testing.assert_allclose(weight_gradient, gradient.weight, atol=1e-4)


def test_span_residuals_match_segment_conditional(indexed_project):
    index = indexed_project.index
    offsets = index["train_sentence_offsets"]
    for span in np.flatnonzero(np.asarray(index["train_span_end"]) - np.asarray(index["train_span_start"]) > 1)[:3]:
        sentence = int(index["train_span_sentence"][span])
        start, end = int(index["train_span_start"][span]), int(index["train_span_end"][span])
        features, labels = sentence_arrays(index, "train", sentence)
        emissions, tags, mask, parameters = kernel_inputs(index, features, labels)
        expected = crf.segment_conditional(emissions, tags, mask, *parameters, torch.tensor([start]), torch.tensor([end]))
        first = offsets[sentence]
        stored = index["train_span_residuals"][first + start : first + end]
        np.testing.assert_allclose(stored, expected.residuals[0, start:end].numpy(), atol=1e-5)
        assert index["train_span_loss"][span] == pytest.approx(-expected.log_likelihood.item(), rel=1e-5)


def test_sentence_arrays_match_autograd(indexed_project):
    index = indexed_project.index
    offsets = index["train_sentence_offsets"]
    chosen = [0, 5, len(offsets) - 2]
    transitions, start_gradient, end_gradient = edge_gradients(index, "sentence", chosen)
    for row, sentence in enumerate(chosen):
        features, labels = sentence_arrays(index, "train", sentence)
        gradient = segment_gradient(features, labels, index.head, 0, len(labels))
        np.testing.assert_allclose(transitions[row], gradient.transitions, atol=1e-5)
        np.testing.assert_allclose(start_gradient[row], gradient.start, atol=1e-5)
        np.testing.assert_allclose(end_gradient[row], gradient.end, atol=1e-5)
        residuals = np.asarray(index["train_sentence_residuals"][offsets[sentence] : offsets[sentence + 1]], dtype=np.float64)
        np.testing.assert_allclose(residuals.sum(0), gradient.bias, atol=1e-5)
        emissions, tags, mask, parameters = kernel_inputs(index, features, labels)
        loss = crf.log_partition(emissions, mask, *parameters) - crf.path_score(emissions, tags, mask, *parameters)
        assert index["train_sentence_loss"][sentence] == pytest.approx(loss.item(), rel=1e-5)


def test_eval_residuals_under_gold_and_predicted(indexed_project):
    index = indexed_project.index
    offsets = index["test_sentence_offsets"]
    for sentence in (0, 4):
        features, gold = sentence_arrays(index, "test", sentence)
        rows = slice(offsets[sentence], offsets[sentence + 1])
        predicted = np.asarray(index["test_predictions"][rows], dtype=np.int64)
        for labels, name in ((gold, "test_gold_residuals"), (predicted, "test_predicted_residuals")):
            emissions, tags, mask, parameters = kernel_inputs(index, features, labels)
            expected = crf.word_conditional(emissions, tags, mask, *parameters)
            np.testing.assert_allclose(index[name][rows], expected.residuals[0].numpy(), atol=1e-5)


def test_predictions_match_tagger(indexed_project):
    index = indexed_project.index
    predicted = indexed_project.tagger.predict([s.tokens for s in indexed_project.sentences("test")])
    stored = [LABELS[i] for i in index["test_predictions"]]
    flat = [tag for tags in predicted for tag in tags]
    agreement = np.mean([a == b for a, b in zip(stored, flat)])
    # Stored predictions decode the float16 features, so a near tie may flip.
    assert agreement >= 0.97


def test_manifest_describes_every_array(indexed_project):
    folder = indexed_project.path / "index"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"] == LABELS
    assert manifest["splits"]["train"]["sentences"] == len(indexed_project.sentences("train"))
    for name, entry in manifest["arrays"].items():
        array = np.load(folder / f"{name}.npy", mmap_mode="r")
        assert list(array.shape) == entry["shape"], name
        assert array.dtype.name == entry["dtype"], name
    stored = {path.stem for path in folder.glob("*.npy")}
    assert stored == set(manifest["arrays"])
    assert np.load(folder / "train_features.npy", mmap_mode="r").dtype == np.float16
    assert manifest["head_sha256"] == index_module.head_digest(indexed_project.index.head)


def copy_project(project: Project, folder: Path) -> Project:
    """Copy a project without its index and open the copy."""
    shutil.copytree(project.path, folder, ignore=shutil.ignore_patterns("index"))
    return Project.load(folder, device="cpu")


def test_chunk_size_gives_same_arrays(indexed_project, tmp_path):
    other = copy_project(indexed_project, tmp_path / "copy")
    build_index(other, chunk_sentences=64, progress=False)
    first, second = indexed_project.path / "index", other.path / "index"
    for name in json.loads((second / "manifest.json").read_text())["arrays"]:
        np.testing.assert_allclose(np.load(first / f"{name}.npy"), np.load(second / f"{name}.npy"), atol=1e-5, err_msg=name)


def test_failed_build_keeps_previous_index(indexed_project, tmp_path, monkeypatch):
    other = copy_project(indexed_project, tmp_path / "copy")
    build_index(other, progress=False)
    before = (other.path / "index" / "manifest.json").read_text()

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(index_module, "write_train_terms", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        build_index(other, progress=False)
    assert (other.path / "index" / "manifest.json").read_text() == before
    assert not [p.name for p in other.path.iterdir() if p.name.startswith(".index")]


def test_missing_index_names_command(tiny_encoder, tmp_path):
    folder = write_tiny_project(tmp_path / "fresh", tiny_encoder, train=5)
    project = Project.load(folder, device="cpu")
    with pytest.raises(IndexNotBuiltError, match="segflu index"):
        project.explain("test", 0, 0, 1)


def test_data_path_outside_project_rejected(tiny_encoder, tmp_path):
    folder = write_tiny_project(tmp_path / "escape", tiny_encoder, train=5)
    config = json.loads((folder / "project.json").read_text())
    config["data"]["train"]["path"] = "../outside.conll"
    (folder / "project.json").write_text(json.dumps(config))
    with pytest.raises(UnsafePathError, match="outside the project folder"):
        Project.load(folder)


def test_label_indices_reject_unknown_and_empty():
    from segflu_core.errors import ProjectError

    assert index_module.label_indices([["O", "B-PER"]], LABELS, split="train")[0].tolist() == [0, LABELS.index("B-PER")]
    with pytest.raises(ProjectError, match="B-DATE"):
        index_module.label_indices([["O"], ["B-DATE"]], LABELS, split="train")
    with pytest.raises(ProjectError, match="no tokens"):
        index_module.label_indices([[]], LABELS, split="dev")


def test_gold_spans_cover_every_word():
    tags = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"]]
    spans = index_module.gold_spans(tags)
    bounds = list(zip(spans.sentence.tolist(), spans.start.tolist(), spans.end.tolist()))
    assert bounds == [(0, 0, 2), (0, 2, 3), (0, 3, 4), (1, 0, 1), (1, 1, 3)]


def test_empty_dev_split_indexed(tiny_encoder, tmp_path):
    folder = write_tiny_project(tmp_path / "empty-dev", tiny_encoder, train=4)
    (folder / "data" / "dev.conll").write_text("-DOCSTART-\tO\n\n", encoding="utf-8")
    project = Project.load(folder, device="cpu")
    build_index(project, progress=False)
    assert project.index["dev_features"].shape[0] == 0
    assert project.index["dev_sentence_offsets"].tolist() == [0]
    assert project.errors("dev").empty


def test_index_of_other_data_rejected(indexed_project, tmp_path):
    other = copy_project(indexed_project, tmp_path / "stale")
    build_index(other, progress=False)
    train = other.path / "data" / "train.conll"
    train.write_text(train.read_text() + "\nextra\tO\n", encoding="utf-8")
    reopened = Project.load(other.path, device="cpu")
    with pytest.raises(IndexNotBuiltError, match="rebuild the index"):
        reopened.explain("test", 0, 0, 1)


def test_index_after_label_change_rejected(indexed_project, tmp_path):
    other = copy_project(indexed_project, tmp_path / "relabelled")
    build_index(other, progress=False)
    train = other.path / "data" / "train.conll"
    train.write_text(train.read_text().replace("\tB-PER", "\tB-ORG", 1), encoding="utf-8")
    reopened = Project.load(other.path, device="cpu")
    with pytest.raises(IndexNotBuiltError, match="tokens or tags changed"):
        reopened.explain("test", 0, 0, 1)
