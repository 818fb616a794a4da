"""In-place index updates after label edits, against an index built from data files with the edits written in."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from segflu_core.edits import EditStore
from segflu_core.errors import ProjectError
from segflu_core.influence.index import build_index
from segflu_core.influence.update import update_index_sentences
from segflu_core.project import EDITS_FILE, Project
from tests.synthetic import write_conll
from tests.test_index import write_tiny_project


@dataclass
class EditedProjects:
    """A project updated in place after edits, the same data rebuilt from scratch, and the arrays before the edits."""

    edited: Project
    fresh: Project
    before: dict[str, np.ndarray]
    before_manifest: dict
    changed: dict[str, set[int]]
    updated: dict[str, list[int]]


def load_arrays(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return {name: np.load(folder / f"{name}.npy") for name in manifest["arrays"]}, manifest


def find_position(sentences, condition) -> tuple[int, int]:
    """Return the first (sentence, word) for which ``condition(tags, word)`` holds."""
    for number, sentence in enumerate(sentences):
        for word in range(len(sentence.tags)):
            if condition(sentence.tags, word):
                return number, word
    raise AssertionError("the synthetic corpus has no word of the requested kind")


def make_edits(project: Project) -> dict[str, set[int]]:
    """Save four kinds of edits and return the sentences whose labels end up changed, per split."""
    store = EditStore(project.path / EDITS_FILE)
    train = project.sentences("train")

    def relabel(split, sentence, start, end, label):
        store.relabel(split, sentence, start, end, label, current_tags=project.sentence(split, sentence).tags)

    single, word = find_position(train, lambda tags, t: tags[t] == "O")
    relabel("train", single, word, word + 1, "LOC")
    merged, pair = find_position(
        train[single + 1 :], lambda tags, t: t + 1 < len(tags) and tags[t] == "O" and tags[t + 1] == "O"
    )
    merged += single + 1
    relabel("train", merged, pair, pair + 2, "PER")
    removed, first = find_position(
        train[merged + 1 :], lambda tags, t: t + 1 < len(tags) and tags[t].startswith("B-") and tags[t + 1].startswith("I-")
    )
    removed += merged + 1
    end = first + 1
    while end < len(train[removed].tags) and train[removed].tags[end].startswith("I-"):
        end += 1
    relabel("train", removed, first, end, None)
    undone = removed + 1
    relabel("train", undone, 0, 1, "ORG")
    store.undo()

    dev_sentence, dev_word = find_position(project.sentences("dev"), lambda tags, t: tags[t].startswith("B-"))
    new_type = "ORG" if project.sentence("dev", dev_sentence).tags[dev_word] != "B-ORG" else "LOC"
    relabel("dev", dev_sentence, dev_word, dev_word + 1, new_type)
    return {"train": {single, merged, removed}, "dev": {dev_sentence}, "test": set()}


def write_edited_copy(project: Project, folder: Path) -> Project:
    """Copy the project without index and edits, with the edited tags written into its data files."""
    shutil.copytree(project.path, folder, ignore=shutil.ignore_patterns("index", EDITS_FILE + "*"))
    for split in project.splits:
        pairs = [(list(s.tokens), list(s.tags)) for s in project.sentences(split)]
        write_conll(folder / "data" / f"{split}.conll", pairs, docstart_every=5 if split == "train" else 3)
    return Project.load(folder, device="cpu")


@pytest.fixture(scope="module")
def projects(tiny_encoder, tmp_path_factory) -> EditedProjects:
    root = tmp_path_factory.mktemp("update")
    edited = Project.load(write_tiny_project(root / "edited", tiny_encoder, train=30), device="cpu")
    build_index(edited, hessian=True, chunk_sentences=7, progress=False)
    before, before_manifest = load_arrays(edited.path / "index")
    changed = make_edits(edited)
    updated = edited.apply_edits()
    fresh = write_edited_copy(edited, root / "fresh")
    build_index(fresh, hessian=True, chunk_sentences=7, progress=False)
    return EditedProjects(edited, fresh, before, before_manifest, changed, updated)


def assert_arrays_close(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, name
    if np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_allclose(actual, expected, atol=1e-5, err_msg=name)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_update_recomputes_changed_sentences(projects):
    assert {split: set(rows) for split, rows in projects.updated.items()} == projects.changed


def test_updated_arrays_match_fresh_index(projects):
    updated, manifest = load_arrays(projects.edited.path / "index")
    fresh, fresh_manifest = load_arrays(projects.fresh.path / "index")
    assert set(updated) == set(fresh)
    for name in fresh:
        assert_arrays_close(updated[name], fresh[name], name)
    assert manifest["train_spans"] == fresh_manifest["train_spans"]
    assert manifest["arrays"] == fresh_manifest["arrays"]
    for split in ("train", "dev", "test"):
        assert manifest["splits"][split]["sha256"] == fresh_manifest["splits"][split]["sha256"], split


def spans_per_sentence(span_sentence: np.ndarray, num_sentences: int) -> np.ndarray:
    return np.bincount(span_sentence, minlength=num_sentences)


def test_span_counts_follow_edits(projects):
    before = spans_per_sentence(projects.before["train_span_sentence"], len(projects.before["train_sentence_loss"]))
    updated = np.load(projects.edited.path / "index" / "train_span_sentence.npy")
    after = spans_per_sentence(updated, len(before))
    single, merged, removed = sorted(projects.changed["train"])
    assert after[single] == before[single]
    assert after[merged] == before[merged] - 1
    assert after[removed] > before[removed]
    others = np.setdiff1d(np.arange(len(before)), [single, merged, removed])
    np.testing.assert_array_equal(after[others], before[others])


def unchanged_rows(offsets: np.ndarray, changed: set[int]) -> np.ndarray:
    keep = np.ones(offsets[-1], dtype=bool)
    for sentence in changed:
        keep[offsets[sentence] : offsets[sentence + 1]] = False
    return keep


def test_other_sentences_untouched(projects):
    updated, _manifest = load_arrays(projects.edited.path / "index")
    before = projects.before
    for split in ("train", "dev", "test"):
        offsets = before[f"{split}_sentence_offsets"]
        keep = unchanged_rows(offsets, projects.changed[split])
        word_arrays = [
            name for name, array in before.items()
            if name.startswith(f"{split}_") and array.shape[:1] == (offsets[-1],) and name != "train_span_ids"
        ]
        assert len(word_arrays) >= 4, split
        for name in word_arrays:
            np.testing.assert_array_equal(updated[name][keep], before[name][keep], err_msg=name)
    changed = sorted(projects.changed["train"])
    kept_sentences = np.setdiff1d(np.arange(len(before["train_sentence_loss"])), changed)
    for name in ("sentence_loss", "sentence_transitions"):
        np.testing.assert_array_equal(updated[f"train_{name}"][kept_sentences], before[f"train_{name}"][kept_sentences], err_msg=name)
    old_keep = ~np.isin(before["train_span_sentence"], changed)
    new_keep = ~np.isin(updated["train_span_sentence"], changed)
    for name in ("span_sentence", "span_start", "span_end", "span_loss"):
        np.testing.assert_array_equal(updated[f"train_{name}"][new_keep], before[f"train_{name}"][old_keep], err_msg=name)
    old_rows = old_keep[before["train_multiword_spans"]]
    new_rows = new_keep[updated["train_multiword_spans"]]
    np.testing.assert_array_equal(updated["train_span_transitions"][new_rows], before["train_span_transitions"][old_rows])


def test_unchanged_arrays_keep_values(projects):
    updated, _manifest = load_arrays(projects.edited.path / "index")
    for name in ("train_features", "train_predictions", "dev_predictions", "dev_predicted_residuals", "head_weight"):
        np.testing.assert_array_equal(updated[name], projects.before[name], err_msg=name)


def test_second_apply_is_noop(projects):
    manifest_path = projects.edited.path / "index" / "manifest.json"
    written = manifest_path.stat().st_mtime_ns
    assert projects.edited.apply_edits() == {"train": [], "dev": [], "test": []}
    assert manifest_path.stat().st_mtime_ns == written
    last_id = max(edit.id for edit in projects.edited.edit_store().edits(include_undone=True) if edit.split == "train")
    assert json.loads(manifest_path.read_text())["splits"]["train"]["edits"]["last_id"] == last_id


def test_explain_shows_edited_gold(projects):
    options = {"granularity": "span", "top_k": 1000}
    rows = projects.edited.explain("dev", 0, 0, 1, **options)
    assert set(rows["sentence"]) >= projects.changed["train"]
    sentences = projects.edited.sentences("train")
    for _position, row in rows.iterrows():
        tags = sentences[int(row["sentence"])].tags[int(row["start"]) : int(row["end"])]
        assert row["gold"] == " ".join(tags)
    original = projects.edited.original_sentences("train")
    changed_rows = rows[rows["sentence"].isin(projects.changed["train"])]
    assert any(
        row["gold"] != " ".join(original[int(row["sentence"])].tags[int(row["start"]) : int(row["end"])])
        for _position, row in changed_rows.iterrows()
    )


@pytest.mark.parametrize("granularity", ["word", "span", "sentence"])
def test_explain_scores_match_fresh(projects, granularity):
    options = {"granularity": granularity, "top_k": 1000}
    updated = projects.edited.explain("dev", 1, 0, 2, **options).sort_values(["sentence", "start"], ignore_index=True)
    fresh = projects.fresh.explain("dev", 1, 0, 2, **options).sort_values(["sentence", "start"], ignore_index=True)
    assert updated[["sentence", "start", "end", "gold"]].equals(fresh[["sentence", "start", "end", "gold"]])
    np.testing.assert_allclose(updated["score"], fresh["score"], rtol=1e-4, atol=1e-6)


def test_rebuild_reads_edited_labels(projects, tmp_path):
    shutil.copytree(projects.edited.path, tmp_path / "rebuilt", ignore=shutil.ignore_patterns("index"))
    rebuilt = Project.load(tmp_path / "rebuilt", device="cpu")
    build_index(rebuilt, chunk_sentences=7, progress=False)
    assert rebuilt.apply_edits() == {"train": [], "dev": [], "test": []}
    arrays, _manifest = load_arrays(rebuilt.path / "index")
    fresh, _fresh_manifest = load_arrays(projects.fresh.path / "index")
    for name in ("train_gold", "train_span_residuals", "train_span_loss", "dev_gold_residuals"):
        assert_arrays_close(arrays[name], fresh[name], name)


def test_project_without_edits_unchanged(tiny_encoder, tmp_path):
    project = Project.load(write_tiny_project(tmp_path / "plain", tiny_encoder, train=6), device="cpu")
    assert project.sentences("train") is project.original_sentences("train")
    assert project.edit_store() is None
    assert not (project.path / EDITS_FILE).exists()


def test_update_rejects_bad_input(projects):
    with pytest.raises(ValueError, match="expected a split"):
        update_index_sentences(projects.edited, "validation", [0])
    with pytest.raises(ValueError, match="expected sentence positions"):
        update_index_sentences(projects.edited, "train", [10_000])


def test_update_of_unchanged_sentence_keeps_arrays(projects):
    folder = projects.edited.path / "index"
    before, _manifest = load_arrays(folder)
    update_index_sentences(projects.edited, "train", [0, 2])
    after, _manifest = load_arrays(folder)
    for name in before:
        assert_arrays_close(after[name], before[name], name)


def test_unwritable_index_raises_project_error(projects, tmp_path, monkeypatch):
    copy = Project.load(shutil.copytree(projects.edited.path, tmp_path / "copy"), device="cpu")
    store = EditStore(copy.path / EDITS_FILE)
    store.relabel("train", 1, 0, 1, "ORG", current_tags=copy.sentence("train", 1).tags)

    def fail(*_args, **_kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("segflu_core.influence.update.replace_arrays", fail)
    with pytest.raises(ProjectError, match="updating the index for the train label edits failed"):
        copy.apply_edits()
