"""Tests of the label edit store: history, replay, durability and damaged databases."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from segflu_core.edits import EditStore
from segflu_core.errors import EditConflictError, EditStoreError
from segflu_core.schemes import relabel_span
from tests.synthetic import make_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]

# Waits until the file GO exists (when given), then makes COUNT edits and
# prints each id once its call has returned. Edit i relabels a random span of
# one to three tokens of sentence FIRST + i, or of sentence i % 3 when SHARED
# is 1, always passing all-O tags as the caller's view. The writer kills itself with
# SIGKILL after KILL_AFTER edits (0: never).
WRITER = """
import os, random, signal, sys, time
from segflu_core.edits import EditStore

path, first, count, kill_after, shared, go = sys.argv[1:7]
first, count, kill_after, shared = int(first), int(count), int(kill_after), shared == "1"
store = EditStore(path)
while go and not os.path.exists(go):
    time.sleep(0.005)
rng = random.Random(first)
tags = ["O"] * 6
for i in range(count):
    sentence = i % 3 if shared else first + i
    start = rng.randrange(6)
    end = rng.randrange(start + 1, min(start + 3, 6) + 1)
    label = rng.choice(["PER", "LOC", None])
    edit = store.relabel("train", sentence, start, end, label, current_tags=tags, note=f"writer {first}")
    print(edit.id, flush=True)
    if i + 1 == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def start_writer(
    database: Path, *, first: int, count: int, kill_after: int = 0, shared: bool = False, go: Path | None = None
) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    arguments = [str(database), str(first), str(count), str(kill_after), "1" if shared else "0", str(go or "")]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


@pytest.fixture()
def store(tmp_path) -> EditStore:
    return EditStore(tmp_path / "edits.sqlite")


def test_relabel_stores_changed_range(store):
    tags = ["B-PER", "I-PER", "I-PER", "O", "B-LOC"]
    edit = store.relabel("train", 3, 1, 2, "ORG", current_tags=tags, note="Title", origin={"method": "influence"})
    expected = relabel_span(tags, 1, 2, "ORG")

    assert expected == ["B-PER", "B-ORG", "B-PER", "O", "B-LOC"]
    assert (edit.start, edit.end) == (1, 2)
    assert (edit.range_start, edit.range_end) == (1, 3)
    assert edit.old_tags == ("I-PER", "I-PER")
    assert edit.new_tags == ("B-ORG", "B-PER")
    assert edit.origin == {"method": "influence"}
    assert not edit.undone
    assert store.apply("train", [["O"]] * 3 + [tags]) == [["O"]] * 3 + [expected]
    assert store.changed_sentences("train") == [3]
    assert store.edits() == [edit]


def test_preview_lists_changes_without_saving(store):
    tags = ["B-PER", "I-PER", "O"]

    changes = store.preview(tags, 0, 1, None)

    assert changes == [(0, "B-PER", "O"), (1, "I-PER", "B-PER")]
    assert store.edits(include_undone=True) == []


def test_history_matches_brute_force(store):
    corpus = make_corpus(4, seed=3)
    base = [tags for _, tags in corpus]
    rng = random.Random(7)
    current = [list(tags) for tags in base]
    done: list[list[list[str]]] = []
    undone: list[list[list[str]]] = []
    for _ in range(60):
        action = rng.choice(["edit", "edit", "undo", "redo"])
        if action == "edit":
            sentence = rng.randrange(len(base))
            start = rng.randrange(len(base[sentence]))
            end = rng.randrange(start + 1, min(start + 3, len(base[sentence])) + 1)
            label = rng.choice(["PER", "LOC", "MISC", None])
            done.append([list(tags) for tags in current])
            undone.clear()
            store.relabel("train", sentence, start, end, label, current_tags=current[sentence])
            current[sentence] = relabel_span(current[sentence], start, end, label)
        elif action == "undo":
            result = store.undo()
            assert (result is None) == (not done)
            if done:
                undone.append(current)
                current = done.pop()
        else:
            result = store.redo()
            assert (result is None) == (not undone)
            if undone:
                done.append(current)
                current = undone.pop()
        assert store.apply("train", base) == current


def test_new_edit_clears_redo(store):
    tags = ["O", "O", "O", "O"]
    first = store.relabel("train", 0, 0, 1, "PER", current_tags=tags)
    store.undo()
    store.relabel("train", 0, 2, 3, "LOC", current_tags=tags)

    assert store.redo() is None
    assert store.edits(include_undone=True)[0].id == first.id
    assert store.edits(include_undone=True)[0].undone
    assert store.apply("train", [tags]) == [["O", "O", "B-LOC", "O"]]


def test_undo_on_empty_history(store):
    assert store.undo() is None
    assert store.redo() is None


def test_undo_edit_refused_when_later_overlaps(store):
    tags = ["B-PER", "I-PER", "O", "O", "O"]
    first = store.relabel("train", 0, 0, 2, "ORG", current_tags=tags)
    tags_after_first = store.apply("train", [tags])[0]
    second = store.relabel("train", 0, 1, 2, "LOC", current_tags=tags_after_first)

    with pytest.raises(EditConflictError, match=rf"later edit\(s\) {second.id} changed the same tokens"):
        store.undo_edit(first.id)
    assert not store.edits()[0].undone

    store.undo_edit(second.id)
    store.undo_edit(first.id)
    assert store.apply("train", [tags]) == [tags]


def test_undo_edit_of_older_disjoint_edit(store):
    tags = ["O"] * 6
    first = store.relabel("train", 0, 0, 1, "PER", current_tags=tags)
    store.relabel("train", 0, 3, 5, "LOC", current_tags=["B-PER"] + ["O"] * 5)
    other_sentence = store.relabel("train", 1, 0, 2, "ORG", current_tags=tags)

    undone = store.undo_edit(first.id)

    assert undone.undone
    assert store.apply("train", [tags, tags]) == [
        ["O", "O", "O", "B-LOC", "I-LOC", "O"],
        ["B-ORG", "I-ORG", "O", "O", "O", "O"],
    ]
    with pytest.raises(ValueError, match="already undone"):
        store.undo_edit(first.id)
    with pytest.raises(ValueError, match="saved edit"):
        store.undo_edit(other_sentence.id + 100)


def test_redo_after_undo_edit(store):
    tags = ["O"] * 4
    first = store.relabel("train", 0, 0, 1, "PER", current_tags=tags)
    store.relabel("train", 0, 2, 3, "LOC", current_tags=["B-PER", "O", "O", "O"])
    store.undo_edit(first.id)

    redone = store.redo()

    assert redone.id == first.id
    assert not redone.undone
    assert store.apply("train", [tags]) == [["B-PER", "O", "B-LOC", "O"]]
    assert store.redo() is None


def test_stale_tags_keep_other_session_edit(tmp_path):
    tab_one = EditStore(tmp_path / "edits.sqlite")
    tab_two = EditStore(tmp_path / "edits.sqlite")
    tags = ["O", "O", "O", "O"]

    tab_one.relabel("train", 0, 0, 3, "PER", current_tags=tags)
    # Tab two still shows all-O tags and removes the middle token from the
    # person tab one just made, which leaves two one-token persons.
    edit = tab_two.relabel("train", 0, 1, 2, None, current_tags=tags)

    assert tab_one.apply("train", [tags]) == [["B-PER", "O", "B-PER", "O"]]
    assert edit.old_tags == ("I-PER", "I-PER")
    assert edit.new_tags == ("O", "B-PER")


def test_edit_filters(store):
    tags = ["O", "O", "O"]
    per = store.relabel("train", 0, 0, 1, "PER", current_tags=tags, note="Capitalised name", doc="doc-1")
    removed = store.relabel("train", 1, 0, 1, None, current_tags=["B-LOC", "O", "O"], doc="doc-2")
    dev = store.relabel("dev", 0, 1, 2, "PER", current_tags=tags, note="other NAME")
    store.undo()

    assert store.edits(split="train") == [per, removed]
    assert store.edits(label="PER") == [per]
    assert store.edits(label="O") == [removed]
    assert store.edits(doc="doc-2") == [removed]
    assert store.edits(note_contains="NAME") == [per]
    assert [e.id for e in store.edits(note_contains="name", include_undone=True)] == [per.id, dev.id]


def test_relabel_rejects_invalid_input(store):
    with pytest.raises(ValueError, match="expected a span"):
        store.relabel("train", 0, 2, 2, "PER", current_tags=["O", "O", "O"])
    with pytest.raises(ValueError, match="expected an entity type"):
        store.relabel("train", 0, 0, 1, "B-PER", current_tags=["O"])
    with pytest.raises(ValueError, match="sentence position"):
        store.relabel("train", -1, 0, 1, "PER", current_tags=["O"])
    with pytest.raises(ValueError, match="JSON-serialisable origin"):
        store.relabel("train", 0, 0, 1, "PER", current_tags=["O"], origin={"scores": {1.5, 2.5}})
    assert store.edits(include_undone=True) == []


def test_relabel_accepts_numpy_positions(store):
    import numpy as np

    edit = store.relabel("train", np.int64(2), np.int64(0), np.int64(1), "PER", current_tags=["O", "O"])

    assert (edit.sentence, edit.start, edit.end) == (2, 0, 1)
    assert type(edit.sentence) is int
    assert store.changed_sentences("train") == [2]


def test_apply_detects_changed_data(store):
    store.relabel("train", 0, 0, 1, "PER", current_tags=["O", "O"])

    with pytest.raises(EditStoreError, match="data file changed"):
        store.apply("train", [["B-LOC", "O"]])


def test_edits_survive_sigkill_after_return(tmp_path):
    database = tmp_path / "edits.sqlite"
    EditStore(database)

    writer = start_writer(database, first=0, count=50, kill_after=7)
    output, errors = writer.communicate(timeout=60)

    assert writer.returncode == -signal.SIGKILL, errors
    reported = [int(line) for line in output.split()]
    assert len(reported) == 7
    assert [edit.id for edit in EditStore(database).edits()] == reported


def test_edits_survive_sigkill_from_outside(tmp_path):
    database = tmp_path / "edits.sqlite"
    EditStore(database)

    writer = start_writer(database, first=0, count=100_000)
    reported = [int(writer.stdout.readline()) for _ in range(20)]
    writer.kill()
    writer.wait(timeout=30)
    writer.stdout.close()
    writer.stderr.close()

    stored = {edit.id for edit in EditStore(database).edits()}
    assert set(reported) <= stored
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_two_processes_lose_no_edit(tmp_path):
    database = tmp_path / "edits.sqlite"
    EditStore(database)

    go = tmp_path / "go"
    writers = [start_writer(database, first=first, count=100, go=go) for first in (0, 100)]
    go.touch()
    results = [writer.communicate(timeout=120) for writer in writers]

    for writer, (_, errors) in zip(writers, results):
        assert writer.returncode == 0, errors
    reported = [int(line) for output, _ in results for line in output.split()]
    edits = EditStore(database).edits()
    assert len(reported) == 200
    assert sorted(reported) == [edit.id for edit in edits]
    assert sorted(edit.sentence for edit in edits) == list(range(200))


def test_read_only_database_rejects_writes(tmp_path):
    database = tmp_path / "edits.sqlite"
    saved = EditStore(database).relabel("train", 0, 0, 1, "PER", current_tags=["O", "O"])
    content = database.read_bytes()
    database.chmod(0o444)

    store = EditStore(database)
    with pytest.raises(EditStoreError, match="read-only.*chmod u\\+w"):
        store.relabel("train", 0, 1, 2, "LOC", current_tags=["B-PER", "O"])
    with pytest.raises(EditStoreError, match="read-only"):
        store.undo()

    assert store.edits() == [saved]
    assert database.read_bytes() == content


def test_damaged_database_raises(tmp_path):
    database = tmp_path / "edits.sqlite"
    content = b"this is not an SQLite file\n" * 200
    database.write_bytes(content)

    with pytest.raises(EditStoreError, match="damaged; move it aside"):
        EditStore(database)
    assert database.read_bytes() == content


def test_locked_database_raises(tmp_path):
    database = tmp_path / "edits.sqlite"
    saved = EditStore(database).relabel("train", 0, 0, 1, "PER", current_tags=["O", "O"])
    store = EditStore(database, busy_timeout_s=0.2)
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(EditStoreError, match="locked by another process"):
            store.relabel("train", 1, 0, 1, "LOC", current_tags=["O", "O"])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert store.edits() == [saved]


def test_concurrent_stale_writers_match_replay(tmp_path):
    database = tmp_path / "edits.sqlite"
    EditStore(database)
    go = tmp_path / "go"

    writers = [start_writer(database, first=first, count=30, shared=True, go=go) for first in (0, 1)]
    go.touch()
    results = [writer.communicate(timeout=120) for writer in writers]

    for writer, (_, errors) in zip(writers, results):
        assert writer.returncode == 0, errors
    edits = EditStore(database).edits()
    assert len(edits) == 60
    # Both writers pass stale all-O tags, so every edit must have been applied
    # to the tags stored before it, in the order of the edit ids.
    expected = [["O"] * 6 for _ in range(3)]
    for edit in edits:
        expected[edit.sentence] = relabel_span(expected[edit.sentence], edit.start, edit.end, edit.label)
    assert EditStore(database).apply("train", [["O"] * 6] * 3) == expected
