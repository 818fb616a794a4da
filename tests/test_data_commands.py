"""``segflu check`` and ``segflu convert`` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

from segflu_core.cli import main
from tests.conftest import shared_file

DATA = Path(__file__).parent / "data"


def ner_column(path: Path) -> list[str]:
    """Return the last column of every token line, DOCSTART lines included, read without segflu."""
    column = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            column.append(line.split(" ")[-1])
    return column


def test_convert_conll2003_to_iob2_matches_conllpp(tmp_path):
    source = shared_file("conll2003_original/eng.train")
    reference = shared_file("conllpp/conllpp_train.txt")
    out = tmp_path / "eng.train.iob2"
    assert main(["convert", str(source), str(out), "--scheme", "iob2"]) == 0
    converted, expected = ner_column(out), ner_column(reference)
    assert len(converted) == len(expected)
    mismatches = [i for i, (a, b) in enumerate(zip(converted, expected)) if a != b]
    assert mismatches == []
    # Only the NER column changes: token, POS and chunk columns stay as in the source.
    source_lines = source.read_bytes().split(b"\n")
    out_lines = out.read_bytes().split(b"\n")
    assert [line.rsplit(b" ", 1)[0] for line in source_lines] == [line.rsplit(b" ", 1)[0] for line in out_lines]


def test_check_text_report(capsys):
    assert main(["check", str(DATA / "iob1_crlf_bom.conll")]) == 0
    output = capsys.readouterr().out
    assert "documents: 2" in output
    assert "sentences: 3" in output
    assert "tokens: 15" in output
    assert "entities: LOC 2, MISC 1, ORG 1, PER 3" in output
    assert "scheme: iob1" in output
    assert "errors: 0" in output


def test_check_json_lists_problems(capsys):
    path = DATA / "iob2_problems.conll"
    assert main(["check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scheme"] == "iob2"
    assert report["errors"] == []
    assert [problem["line"] for problem in report["problems"]] == [1, 4]
    assert report["problems"][0]["message"].startswith(f"{path}:1: ")
    assert report["entities"] == {"LOC": 1, "PER": 5}


def test_check_errors_exit_one(tmp_path, capsys):
    path = tmp_path / "bad.conll"
    path.write_bytes(b"a O\nb B-PER x\n\n O\nc Z-LOC\n")
    assert main(["check", str(path)]) == 1
    output = capsys.readouterr().out
    assert "errors: 3" in output
    assert f"{path}:2: expected 2 columns as on line 1, got 3" in output
    assert f"{path}:4: empty token" in output
    assert f"{path}:5: unknown tag 'Z-LOC'" in output


def test_check_plain_labels(capsys):
    path = shared_file("ebm_nlp/acl_lstm_crf_data/test.txt")
    assert main(["check", str(path), "--scheme", "plain", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sentences"] == 2139
    assert report["documents"] == 191
    assert report["tokens"] == 46512
    assert set(report["entities"]) == {"P", "I", "N"}


def test_convert_repair_and_jsonl(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["convert", str(DATA / "iob2_problems.conll"), str(out), "--format", "jsonl", "--repair"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records[0]["ner_tags"] == ["B-PER", "O", "B-PER", "B-LOC"]
    assert "2 invalid tag sequence(s) repaired" in capsys.readouterr().err


def test_convert_keeps_problems_without_repair(tmp_path):
    out = tmp_path / "out.conll"
    assert main(["convert", str(DATA / "iob2_problems.conll"), str(out)]) == 0
    assert out.read_bytes() == (DATA / "iob2_problems.conll").read_bytes()


def test_convert_to_bioes_and_back(tmp_path):
    source = DATA / "iob2_tab_no_final_newline.tsv"
    bioes = tmp_path / "bioes.tsv"
    back = tmp_path / "back.tsv"
    assert main(["convert", str(source), str(bioes), "--scheme", "bioes"]) == 0
    assert bioes.read_bytes().split(b"\n")[:2] == ["Über\tB-PER".encode(), "Müller\tE-PER".encode()]
    assert main(["convert", str(bioes), str(back), "--scheme", "iob2"]) == 0
    assert back.read_bytes() == source.read_bytes()


def test_convert_missing_file_is_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.conll"), str(tmp_path / "out")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
