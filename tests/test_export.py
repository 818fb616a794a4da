"""Tests of exporting corrected files: byte-for-byte CoNLL, JSON Lines, DocBin and path checks."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from segflu_core.cli import main
from segflu_core.conll import read_corpus
from segflu_core.edits import EditStore
from segflu_core.errors import ExportTargetExistsError, UnsafePathError
from segflu_core.export import export_corrected, summarize_changes
from segflu_core.schemes import convert_tags, relabel_span, tags_to_spans
from tests.synthetic import make_corpus, write_conll


def make_project(tmp_path: Path, *, scheme: str = "iob2", num_sentences: int = 12) -> Path:
    """Build a project folder whose train split is a generated CoNLL file in ``scheme``."""
    sentences = [(tokens, convert_tags(tags, "iob2", scheme)) for tokens, tags in make_corpus(num_sentences, seed=5)]
    source_dir = tmp_path / "imported"
    source_dir.mkdir()
    source = write_conll(source_dir / "train.conll", sentences, docstart_every=4)
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copyfile(source, project / "data" / "train.conll")
    config = {
        "data": {
            "train": {
                "path": "data/train.conll",
                "source": str(source),
                "format": "conll",
                "tag_column": -1,
                "encoding": "utf-8",
                "scheme": scheme,
            }
        }
    }
    (project / "project.json").write_text(json.dumps(config), encoding="utf-8")
    return project


def train_tags(project: Path) -> list[list[str]]:
    """Read the IOB2 tags of the project's train copy, as the app does before an edit."""
    scheme = json.loads((project / "project.json").read_text(encoding="utf-8"))["data"]["train"]["scheme"]
    corpus = read_corpus(project / "data" / "train.conll", scheme=scheme)
    return [list(sentence.tags) for sentence in corpus.sentences]


def first_sentence_with(tags: list[list[str]], prefix: list[str]) -> int:
    return next(i for i, sentence in enumerate(tags) if sentence[: len(prefix)] == prefix)


def token_line_numbers(path: Path) -> list[list[int]]:
    """Return the 0-based line number of each token, per sentence, skipping ``-DOCSTART-`` blocks."""
    sentences: list[list[int]] = []
    current: list[int] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        if line.startswith("-DOCSTART-"):
            continue
        if line.strip():
            current.append(number)
        elif current:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def changed_lines(before: Path, after: Path) -> dict[int, tuple[str, str]]:
    old_lines = before.read_text(encoding="utf-8").split("\n")
    new_lines = after.read_text(encoding="utf-8").split("\n")
    assert len(old_lines) == len(new_lines)
    return {i: (old, new) for i, (old, new) in enumerate(zip(old_lines, new_lines)) if old != new}


def test_undone_edits_export_identical(tmp_path):
    project = make_project(tmp_path)
    tags = train_tags(project)
    store = EditStore(project / "edits.sqlite")
    store.relabel("train", 0, 0, 1, "ORG", current_tags=tags[0])
    store.relabel("train", 2, 1, 3, None, current_tags=tags[2])
    store.relabel("train", 5, 0, 2, "LOC", current_tags=tags[5])
    while store.undo() is not None:
        pass

    summary = export_corrected(project, project / "corrected.conll")

    assert (project / "corrected.conll").read_bytes() == (project / "data" / "train.conll").read_bytes()
    assert summary.num_edits == 0
    assert summary.tokens_changed == 0
    assert summary.entities_before == summary.entities_after


def test_project_without_edits_exports_identical(tmp_path):
    project = make_project(tmp_path)

    export_corrected(project, project / "corrected.conll")

    assert (project / "corrected.conll").read_bytes() == (project / "data" / "train.conll").read_bytes()
    assert not (project / "edits.sqlite").exists()


@pytest.mark.parametrize("scheme", ["bioes", "iob1"])
def test_edit_changes_only_span_lines(tmp_path, scheme):
    project = make_project(tmp_path, scheme=scheme)
    tags = train_tags(project)
    sentence = first_sentence_with(tags, ["B-PER", "I-PER"])
    # Relabelling the second token of a two-token person splits it into two
    # entities, so the first token's tag changes too in BIOES but not in IOB1.
    edit = EditStore(project / "edits.sqlite").relabel("train", sentence, 1, 2, "ORG", current_tags=tags[sentence])
    new_iob2 = relabel_span(tags[sentence], 1, 2, "ORG")
    old_written = convert_tags(tags[sentence], "iob2", scheme)
    new_written = convert_tags(new_iob2, "iob2", scheme)
    positions = [i for i, (old, new) in enumerate(zip(old_written, new_written)) if old != new]
    lines = token_line_numbers(project / "data" / "train.conll")[sentence]

    export_corrected(project, project / "corrected.conll")
    changes = changed_lines(project / "data" / "train.conll", project / "corrected.conll")

    assert positions == ([0, 1] if scheme == "bioes" else [1])
    # The edit's range is in IOB2. BIOES also marks the token before or after
    # a changed range (B- becomes S-), but no token further away.
    assert all(edit.range_start - 1 <= i <= edit.range_end for i in positions)
    assert sorted(changes) == [lines[i] for i in positions]
    for i in positions:
        old_line, new_line = changes[lines[i]]
        token = old_line.split("\t")[0]
        assert old_line == f"{token}\t{old_written[i]}"
        assert new_line == f"{token}\t{new_written[i]}"


def test_summary_matches_brute_force(tmp_path):
    project = make_project(tmp_path)
    tags = train_tags(project)
    store = EditStore(project / "edits.sqlite")
    expected = [list(sentence) for sentence in tags]
    for sentence, start, end, label in [(0, 0, 1, "ORG"), (3, 1, 3, None), (3, 0, 1, "LOC"), (7, 2, 4, "MISC")]:
        store.relabel("train", sentence, start, end, label, current_tags=expected[sentence])
        expected[sentence] = relabel_span(expected[sentence], start, end, label)

    summary = summarize_changes(project, "train")

    def count(tag_lists):
        return dict(Counter(span.label for t in tag_lists for span in tags_to_spans(t)))

    changed = [i for i in range(len(tags)) if tags[i] != expected[i]]
    assert summary.num_edits == 4
    assert [change.sentence for change in summary.changes] == changed
    assert summary.sentences_changed == len(changed)
    assert summary.tokens_changed == sum(a != b for i in changed for a, b in zip(tags[i], expected[i]))
    assert summary.entities_before == count(tags)
    assert summary.entities_after == count(expected)
    assert [list(change.new_tags) for change in summary.changes] == [expected[i] for i in changed]


def edited_project(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    """Build a project with two edits and return it with the expected IOB2 tags."""
    project = make_project(tmp_path)
    tags = train_tags(project)
    store = EditStore(project / "edits.sqlite")
    store.relabel("train", 1, 0, 1, "MISC", current_tags=tags[1])
    store.relabel("train", 4, 0, 2, None, current_tags=tags[4])
    expected = [list(sentence) for sentence in tags]
    expected[1] = relabel_span(tags[1], 0, 1, "MISC")
    expected[4] = relabel_span(tags[4], 0, 2, None)
    return project, expected


def test_jsonl_export_reads_back(tmp_path):
    project, expected = edited_project(tmp_path)
    tokens = [sentence.tokens for sentence in read_corpus(project / "data" / "train.conll").sentences]

    summary = export_corrected(project, project / "corrected.jsonl", format="jsonl")
    records = [json.loads(line) for line in (project / "corrected.jsonl").read_text(encoding="utf-8").splitlines()]

    assert summary.format == "jsonl"
    assert [record["tokens"] for record in records] == tokens
    assert [record["ner_tags"] for record in records] == expected


def test_spacy_export_reads_back(tmp_path):
    import spacy
    from spacy.tokens import DocBin

    project, expected = edited_project(tmp_path)
    tokens = [sentence.tokens for sentence in read_corpus(project / "data" / "train.conll").sentences]

    export_corrected(project, project / "corrected.spacy", format="spacy")
    docs = list(DocBin().from_disk(project / "corrected.spacy").get_docs(spacy.blank("en").vocab))

    assert [[token.text for token in doc] for doc in docs] == tokens
    entities = [[(ent.start, ent.end, ent.label_) for ent in doc.ents] for doc in docs]
    assert entities == [[(s.start, s.end, s.label) for s in tags_to_spans(t)] for t in expected]
    assert "MISC" in {label for doc in entities for _, _, label in doc}


def test_export_rejects_outside_paths(tmp_path):
    project, _ = edited_project(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (project / "link").symlink_to(outside, target_is_directory=True)

    for path in [outside / "x.conll", project / ".." / "x.conll", project / "link" / "x.conll"]:
        with pytest.raises(UnsafePathError, match="outside the allowed folders"):
            export_corrected(project, path)
    with pytest.raises(UnsafePathError, match="project's state"):
        export_corrected(project, project / "edits.sqlite", overwrite=True)

    assert list(outside.iterdir()) == []
    assert not (tmp_path / "x.conll").exists()


def test_export_allowed_dirs_option(tmp_path):
    project, _ = edited_project(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    summary = export_corrected(project, outside / "x.conll", allowed_dirs=[outside])

    assert summary.path == (outside / "x.conll").resolve()
    assert summary.path.exists()


def test_export_refuses_to_overwrite_original(tmp_path):
    project, expected = edited_project(tmp_path)
    source = tmp_path / "imported" / "train.conll"
    original = source.read_bytes()

    with pytest.raises(ExportTargetExistsError, match="imported original"):
        export_corrected(project, source)
    with pytest.raises(ExportTargetExistsError, match="project's copy"):
        export_corrected(project, project / "data" / "train.conll")
    assert source.read_bytes() == original

    export_corrected(project, source, overwrite=True)
    assert [list(s.tags) for s in read_corpus(source).sentences] == expected


def test_cli_export(tmp_path, capsys):
    project, expected = edited_project(tmp_path)
    out = project / "corrected.jsonl"

    code = main(["export", str(project), str(out), "--format", "jsonl"])
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    assert code == 0
    assert [record["ner_tags"] for record in records] == expected
    assert "2 edits, 2 sentences" in capsys.readouterr().out

    code = main(["export", str(project), str(tmp_path / "imported" / "train.conll")])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_rejects_path_outside_allowed(tmp_path, capsys):
    project, _ = edited_project(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    code = main(["export", str(project), str(outside / "x.conll"), "--allow-dir", str(project)])

    assert code == 2
    assert "outside the allowed folders" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_jsonl_source_exports_jsonl(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    corpus = make_corpus(6, seed=9)
    lines = [json.dumps({"tokens": tokens, "ner_tags": tags}) + "\n" for tokens, tags in corpus]
    (project / "data" / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    config = {"data": {"train": {"path": "data/train.jsonl", "format": "jsonl", "scheme": "iob2"}}}
    (project / "project.json").write_text(json.dumps(config), encoding="utf-8")
    tags = [list(t) for _, t in corpus]
    EditStore(project / "edits.sqlite").relabel("train", 2, 0, 1, "LOC", current_tags=tags[2])
    tags[2] = relabel_span(tags[2], 0, 1, "LOC")

    summary = export_corrected(project, project / "corrected.jsonl")
    exported = read_corpus(project / "corrected.jsonl", format="jsonl")

    assert summary.format == "jsonl"
    assert [sentence.tokens for sentence in exported.sentences] == [tokens for tokens, _ in corpus]
    assert [sentence.tags for sentence in exported.sentences] == tags
