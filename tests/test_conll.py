"""Reading and writing corpora: CoNLL byte round trips, edits, errors, JSON Lines and datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from segflu_core.conll import (
    PLAIN,
    atomic_write_bytes,
    read_conll,
    read_corpus,
    read_corpus_with_errors,
    read_hf_dataset,
    read_jsonl,
    write_jsonl,
)
from segflu_core.errors import ConllFormatError
from segflu_core.schemes import relabel_span
from tests.conftest import SHARED_DATA, shared_file

DATA = Path(__file__).parent / "data"
FIXTURES = [
    "iob1_crlf_bom.conll",
    "iob2_tab_no_final_newline.tsv",
    "bioes_extra_columns.conll",
    "docstart_tab_variant.tsv",
    "iob2_problems.conll",
]


def round_trip(path: Path, tmp_path: Path, **options) -> bytes:
    corpus = read_corpus(path, **options)
    out = tmp_path / "out"
    corpus.write(out)
    return out.read_bytes()


def split_lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_round_trip_is_byte_identical(name, tmp_path):
    path = DATA / name
    assert round_trip(path, tmp_path) == path.read_bytes()


def test_iob1_crlf_bom_structure():
    corpus = read_conll(DATA / "iob1_crlf_bom.conll")
    assert corpus.scheme == "iob1"
    assert corpus.documents == [[0, 1], [2]]
    assert corpus.layout.bom
    first, second, third = corpus.sentences
    assert first.tokens == ["EU", "rejects", "German", "call", "."]
    assert first.tags == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert first.lines == [3, 4, 5, 6, 7]
    assert second.lines == [10, 11]
    assert second.tags == ["B-PER", "I-PER"]
    assert third.tokens[1:3] == ["Paris", "Bonn"]
    assert third.tags == ["O", "B-LOC", "B-LOC", "O", "B-PER", "I-PER", "B-PER", "O"]
    assert corpus.problems == []


def test_tab_file_keeps_nbsp_tokens():
    corpus = read_conll(DATA / "iob2_tab_no_final_newline.tsv")
    assert corpus.layout.separator == "\t"
    assert corpus.scheme == "iob2"
    assert [len(sentence.tokens) for sentence in corpus.sentences] == [8, 4]
    assert corpus.sentences[0].tokens[3] == "24\u00a0h"
    assert corpus.sentences[0].tokens[0] == "Über"
    assert corpus.documents == [[0, 1]]


def test_docstart_variants_and_empty_document():
    corpus = read_conll(DATA / "docstart_tab_variant.tsv")
    assert corpus.documents == [[0], [], [1]]
    assert corpus.sentences[1].tags == ["B-MISC", "I-MISC"]


def test_docstart_without_blank_line():
    corpus = read_conll(DATA / "bioes_extra_columns.conll")
    assert corpus.scheme == "bioes"
    assert corpus.documents == [[0], [1]]
    assert corpus.sentences[1].tokens[0] == "Lisbon"
    assert corpus.sentences[0].tags[:3] == ["B-PER", "I-PER", "I-PER"]
    assert corpus.sentences[1].tags == ["B-LOC", "B-LOC", "O", "B-ORG", "I-ORG"]


def test_problems_kept_unless_repair():
    path = DATA / "iob2_problems.conll"
    corpus = read_conll(path)
    assert [(problem.line, problem.position) for problem in corpus.problems] == [(1, 0), (4, 3)]
    assert corpus.problems[0].repair == ("B-PER", "O", "B-PER", "B-LOC")
    assert str(corpus.problems[0]).startswith(f"{path}:1: ")
    assert corpus.sentences[0].tags == ["I-PER", "O", "B-PER", "I-LOC"]
    repaired = read_conll(path, repair=True)
    assert repaired.sentences[0].tags == ["B-PER", "O", "B-PER", "B-LOC"]
    assert len(repaired.problems) == 2


def test_repair_write_changes_only_bad_lines(tmp_path):
    path = DATA / "iob2_problems.conll"
    out = tmp_path / "out.conll"
    read_conll(path, repair=True).write(out)
    before, after = split_lines(path.read_bytes()), split_lines(out.read_bytes())
    changed = [number for number, (a, b) in enumerate(zip(before, after), start=1) if a != b]
    assert changed == [1, 4]
    assert after[0] == b"Alice B-PER"
    assert after[3] == b"Jones B-LOC"


# Each edit: fixture, sentence, [start, end), new type, and the expected new
# bytes of every line that must change (1-based line -> line content).
EDITS = [
    pytest.param(
        "iob1_crlf_bom.conll", 2, 1, 2, None,
        {16: b"Paris NNP I-NP O\r", 17: b"Bonn NNP I-NP I-LOC\r"},
        id="iob1-crlf-bom",
    ),
    pytest.param(
        "iob2_tab_no_final_newline.tsv", 1, 0, 3, "PER",
        {14: b"John\tI-PER"},
        id="iob2-tab",
    ),
    pytest.param(
        "bioes_extra_columns.conll", 0, 1, 2, "LOC",
        {3: b"John NNP B-NP x S-PER", 4: b"Ronald NNP I-NP x S-LOC", 5: b"Smith NNP I-NP x S-PER"},
        id="bioes-extra-columns",
    ),
]


@pytest.mark.parametrize(("name", "sentence", "start", "end", "label", "expected"), EDITS)
def test_edit_rewrites_only_tag_column(tmp_path, name, sentence, start, end, label, expected):
    path = DATA / name
    corpus = read_conll(path)
    tags = [list(s.tags) for s in corpus.sentences]
    tags[sentence] = relabel_span(tags[sentence], start, end, label)
    out = tmp_path / "edited"
    corpus.write(out, tags=tags)

    before, after = split_lines(path.read_bytes()), split_lines(out.read_bytes())
    assert len(before) == len(after)
    for number, (old, new) in enumerate(zip(before, after), start=1):
        if number in expected:
            assert new == expected[number], number
            assert new.rsplit(maxsplit=1)[0] == old.rsplit(maxsplit=1)[0], number
        else:
            assert new == old, number


def test_edit_through_sentence_tags(tmp_path):
    corpus = read_conll(DATA / "iob2_tab_no_final_newline.tsv")
    corpus.sentences[0].tags[7] = "O"
    out = tmp_path / "out.tsv"
    corpus.write(out)
    assert split_lines(out.read_bytes())[7] == b"Rome\tO"


def test_write_other_scheme_keeps_columns(tmp_path):
    out = tmp_path / "out.conll"
    read_conll(DATA / "iob1_crlf_bom.conll").write(out, scheme="bioes")
    lines = split_lines(out.read_bytes())
    assert lines[0] == b"\xef\xbb\xbf-DOCSTART- -X- O O\r"
    assert lines[2] == b"EU NNP I-NP S-ORG\r"
    assert lines[9] == b"Peter NNP I-NP B-PER\r"
    assert lines[10] == b"Blackburn NNP I-NP E-PER\r"
    back = read_conll(out)
    assert back.scheme == "bioes"
    assert [s.tags for s in back.sentences] == [s.tags for s in read_conll(DATA / "iob1_crlf_bom.conll").sentences]


# Malformed CoNLL input: file bytes, read options, expected message part, expected line.
MALFORMED = [
    pytest.param(b"EU B-ORG\nM\xfcller B-PER\n", {}, "invalid utf-8 byte 0xfc at byte 1", 2, id="invalid-utf8"),
    pytest.param(b"a B-PER\nb O x\n", {}, "expected 2 columns as on line 1, got 3", 2, id="extra-column"),
    pytest.param(b"a NN B-PER\n\nb O\n", {}, "expected 3 columns as on line 1, got 2", 3, id="missing-column"),
    pytest.param(b"a\tO\nb O\n", {}, "expected 2 columns as on line 1, got 1", 2, id="mixed-separator"),
    pytest.param(b"a O\n O\n", {}, "empty token in ' O'", 2, id="empty-token"),
    pytest.param(b"a O\nb  \n", {}, "expected 2 columns as on line 1, got 3", 2, id="double-space"),
    pytest.param(b"a O\r\nb X-PER\r\n", {}, "unknown tag 'X-PER'", 2, id="unknown-prefix"),
    pytest.param(b"a B-\n", {}, "unknown tag 'B-'", 1, id="missing-type"),
    pytest.param(b"a O\nb S-PER\n", {"scheme": "iob2"}, "unknown tag 'S-PER'", 2, id="bioes-tag-in-iob2"),
    pytest.param(b"a O\n", {"tag_column": 0}, "tag column 0", 1, id="token-as-tag-column"),
    pytest.param(b"a O\n", {"tag_column": 5}, "tag column 5", 1, id="missing-tag-column"),
    pytest.param(b"lonely\n", {}, "among 1 columns", 1, id="single-column"),
]


@pytest.mark.parametrize(("data", "options", "message", "line"), MALFORMED)
def test_malformed_conll_names_file_and_line(tmp_path, data, options, message, line):
    path = tmp_path / "bad.conll"
    path.write_bytes(data)
    with pytest.raises(ConllFormatError) as caught:
        read_conll(path, **options)
    assert caught.value.line == line
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_invalid_utf8_suggests_encoding(tmp_path):
    path = tmp_path / "latin.conll"
    path.write_bytes("Müller B-PER\n".encode("cp1252"))
    with pytest.raises(ConllFormatError, match="--encoding cp1252"):
        read_conll(path)
    assert read_conll(path, encoding="cp1252").sentences[0].tokens == ["Müller"]
    out = tmp_path / "out.conll"
    read_conll(path, encoding="cp1252").write(out)
    assert out.read_bytes() == path.read_bytes()


def test_collect_all_errors(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_bytes(b"a O\nb\n\n O\nc X-PER\nd B-PER\n")
    corpus, errors = read_corpus_with_errors(path)
    assert [error.line for error in errors] == [2, 4, 5]
    assert len(corpus.sentences) == 2
    assert corpus.sentences[1].tags == ["O", "B-PER"]


MALFORMED_JSONL = [
    pytest.param('{"tokens": ["a"], "ner_tags": ["O"]}\n{"tokens": ["a"]\n', "invalid JSON", 2, id="invalid-json"),
    pytest.param('{"tokens": ["a"]}\n', "expected 'ner_tags' as a list of strings", 1, id="missing-tags"),
    pytest.param('[1, 2]\n', "expected a JSON object", 1, id="not-object"),
    pytest.param('{"tokens": ["a", "b"], "ner_tags": ["O"]}\n', "got 1 tags for 2 tokens", 1, id="length"),
    pytest.param('{"tokens": ["a", ""], "ner_tags": ["O", "O"]}\n', "empty token at position 1", 1, id="empty"),
    pytest.param('\n{"tokens": ["a"], "ner_tags": ["Q-PER"]}\n', "unknown tag 'Q-PER'", 2, id="prefix"),
    pytest.param('{"tokens": ["a"], "ner_tags": [3]}\n', "list of strings", 1, id="integer-tags"),
]


@pytest.mark.parametrize(("text", "message", "line"), MALFORMED_JSONL)
def test_malformed_jsonl_names_file_and_line(tmp_path, text, message, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConllFormatError) as caught:
        read_jsonl(path)
    assert caught.value.line == line
    assert message in str(caught.value)


def test_jsonl_read():
    corpus = read_corpus(DATA / "sample.jsonl")
    assert corpus.format == "jsonl"
    assert corpus.scheme == "iob2"
    assert [s.id for s in corpus.sentences] == ["s0", "s1", "s2"]
    assert [s.doc_id for s in corpus.sentences] == ["d1", "d1", "d2"]
    assert corpus.documents == [[0, 1], [2]]
    assert corpus.sentences[2].tokens == ["Rome", "été"]
    assert corpus.sentences[1].tags == ["B-ORG", "I-ORG", "O"]


def test_jsonl_write_read_round_trip(tmp_path):
    corpus = read_corpus(DATA / "sample.jsonl")
    out = tmp_path / "out.jsonl"
    corpus.write(out, scheme="bioes")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records[1]["ner_tags"] == ["B-ORG", "E-ORG", "O"]
    assert records[0] == {"id": "s0", "doc_id": "d1", "tokens": ["Mary", "visited", "Paris"],
                          "ner_tags": ["S-PER", "O", "S-LOC"]}
    back = read_corpus(out)
    assert [s.tags for s in back.sentences] == [s.tags for s in corpus.sentences]
    assert back.documents == corpus.documents


def test_conll_to_jsonl_and_back(tmp_path):
    source = read_conll(DATA / "iob1_crlf_bom.conll")
    jsonl = tmp_path / "out.jsonl"
    source.write(jsonl, format="jsonl")
    from_jsonl = read_jsonl(jsonl, scheme="iob1")
    assert from_jsonl.documents == source.documents
    conll = tmp_path / "out.conll"
    from_jsonl.write(conll, format="conll", scheme="iob2")
    back = read_conll(conll)
    assert back.scheme == "iob2"
    assert [s.tokens for s in back.sentences] == [s.tokens for s in source.sentences]
    assert [s.tags for s in back.sentences] == [s.tags for s in source.sentences]
    assert back.documents == source.documents


def test_write_jsonl_function(tmp_path):
    sentences = read_conll(DATA / "iob2_tab_no_final_newline.tsv").sentences
    out = tmp_path / "plain.jsonl"
    write_jsonl(out, sentences)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["tokens"][3] == "24\u00a0h"
    with pytest.raises(ValueError, match="expected 8 tags for sentence 0, got 1"):
        write_jsonl(out, sentences, tags=[["O"], ["O"] * 4])


def _class_label_dataset():
    datasets = pytest.importorskip("datasets")
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({
        "id": datasets.Value("string"),
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
    })
    train = datasets.Dataset.from_dict(
        {"id": ["a", "b"], "tokens": [["John", "Smith", "left"], ["Oslo"]], "ner_tags": [[1, 2, 0], [3]]},
        features=features,
    )
    test = datasets.Dataset.from_dict({"id": ["c"], "tokens": [["in", "Rome"]], "ner_tags": [[0, 3]]},
                                      features=features)
    return datasets, datasets.DatasetDict({"train": train, "test": test})


def test_hf_dataset_dict_class_labels(tmp_path):
    _, dataset = _class_label_dataset()
    folder = tmp_path / "saved"
    dataset.save_to_disk(str(folder))
    corpus = read_corpus(folder)
    assert corpus.format == "hf"
    assert [s.tags for s in corpus.sentences] == [["B-PER", "I-PER", "O"], ["B-LOC"]]
    assert [s.id for s in corpus.sentences] == ["a", "b"]
    test = read_hf_dataset(folder, split="test")
    assert test.sentences[0].tags == ["O", "B-LOC"]
    with pytest.raises(ConllFormatError, match="expected a split in train, test, got 'dev'"):
        read_hf_dataset(folder, split="dev")


def test_hf_single_dataset_and_parquet(tmp_path):
    _, dataset = _class_label_dataset()
    folder = tmp_path / "single"
    dataset["test"].save_to_disk(str(folder))
    assert read_hf_dataset(folder).sentences[0].tokens == ["in", "Rome"]
    parquet = tmp_path / "data.parquet"
    dataset["train"].to_parquet(str(parquet))
    corpus = read_corpus(parquet)
    assert [s.tags for s in corpus.sentences] == [["B-PER", "I-PER", "O"], ["B-LOC"]]


def test_hf_local_files(tmp_path):
    pytest.importorskip("datasets")
    csv = tmp_path / "data.csv"
    csv.write_text("tokens,ner_tags\n\"['John', 'Smith']\",\"['B-PER', 'I-PER']\"\n", encoding="utf-8")
    corpus = read_corpus(csv)
    assert corpus.format == "hf"
    assert corpus.sentences[0].tokens == ["John", "Smith"]
    assert corpus.sentences[0].tags == ["B-PER", "I-PER"]
    from_json = read_corpus(DATA / "sample.jsonl", format="hf")
    assert [s.tags for s in from_json.sentences] == [s.tags for s in read_jsonl(DATA / "sample.jsonl").sentences]
    assert from_json.documents == [[0, 1], [2]]


def test_hf_missing_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"words": [["a"]], "labels": [["O"]]}).save_to_disk(str(folder))
    with pytest.raises(ConllFormatError, match="missing column"):
        read_corpus(folder)


def test_atomic_write_keeps_mode_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# Every CoNLL-format file of the research corpora, as glob patterns under the data folder.
SHARED_CONLL_PATTERNS = [
    "btc/*.conll",
    "conll2002_es/esp.*",
    "conll2003_original/eng.*",
    "conll2003_original/verbatim_hscrf/eng.*",
    "conllpp/conllpp_*.txt",
    "ncbi_disease/conll/*.tsv",
    "wnut17/*.conll",
    "wnut17/emerging.test.annotated",
    "ebm_nlp/acl_lstm_crf_data/dev.txt",
    "ebm_nlp/acl_lstm_crf_data/test.txt",
]

# Read options for files that need them, and the error expected from files with malformed lines.
SHARED_OPTIONS = {
    "ebm_nlp/acl_lstm_crf_data/test.txt": {"scheme": PLAIN},
    "ebm_nlp/acl_lstm_crf_data/dev.txt": {"scheme": PLAIN, "encoding": "cp1252"},
}
SHARED_ERRORS = {
    "btc/f.conll": (16302, "empty token"),
    "btc/h.conll": (22918, "empty token"),
    "ebm_nlp/acl_lstm_crf_data/dev.txt": (1070, "empty token in ' VBD N'"),
}


def shared_conll_files() -> list[str]:
    files = []
    for pattern in SHARED_CONLL_PATTERNS:
        files.extend(str(path.relative_to(SHARED_DATA)) for path in sorted(SHARED_DATA.glob(pattern)))
    return files or ["conll2003_original/eng.train"]


@pytest.mark.parametrize("relative", shared_conll_files())
def test_shared_corpus_round_trip(tmp_path, relative):
    path = shared_file(relative)
    options = SHARED_OPTIONS.get(relative, {})
    if relative in SHARED_ERRORS:
        line, message = SHARED_ERRORS[relative]
        with pytest.raises(ConllFormatError) as caught:
            read_corpus(path, **options)
        assert caught.value.line == line
        assert message in str(caught.value)
        return
    assert round_trip(path, tmp_path, **options) == path.read_bytes()


def test_shared_ebm_labels_are_not_bio():
    path = shared_file("ebm_nlp/acl_lstm_crf_data/test.txt")
    with pytest.raises(ConllFormatError, match="unknown tag 'N'.*scheme 'plain'"):
        read_corpus(path)
    corpus = read_corpus(path, scheme=PLAIN)
    assert set(tag for s in corpus.sentences for tag in s.tags) == {"P", "I", "O", "N"}
    assert any("\u00a0" in token for s in corpus.sentences for token in s.tokens)


def test_shared_ebm_dev_needs_cp1252():
    path = shared_file("ebm_nlp/acl_lstm_crf_data/dev.txt")
    with pytest.raises(ConllFormatError, match="--encoding cp1252") as caught:
        read_corpus(path, scheme=PLAIN)
    assert caught.value.line == 49239
    corpus, errors = read_corpus_with_errors(path, scheme=PLAIN, encoding="cp1252")
    assert len(errors) == 78
    assert all("empty token" in str(error) for error in errors)
    assert len(corpus.sentences) == 5806
