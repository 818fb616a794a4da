"""The command-line dispatcher: argument routing and error handling."""

from __future__ import annotations

import pytest

from segflu_core import cli


@pytest.mark.parametrize(
    ("argv", "segflu_part", "streamlit_part"),
    [
        (["app"], ["app"], []),
        (["app", "--server.port", "8502"], ["app"], ["--server.port", "8502"]),
        (["app", "proj", "--server.port", "8502"], ["app", "proj"], ["--server.port", "8502"]),
        (["-v", "app", "proj"], ["-v", "app", "proj"], []),
        (["app", "proj", "-h"], ["app", "proj", "--help"], []),
        (["check", "app"], ["check", "app"], []),
    ],
)
def test_split_app_arguments(argv, segflu_part, streamlit_part):
    assert cli.split_app_arguments(argv) == (segflu_part, streamlit_part)


def test_app_command_receives_streamlit_options(monkeypatch):
    received = {}

    def fake_run(args):
        received["project"] = args.project
        received["streamlit_args"] = args.streamlit_args
        return 0

    monkeypatch.setattr("segflu_core.commands.app.run", fake_run)
    assert cli.main(["app", "--server.port", "8502"]) == 0
    assert received["project"] is None
    assert received["streamlit_args"] == ["--server.port", "8502"]


def test_unknown_option_rejected_for_other_commands(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["check", "file.conll", "--server.port", "1"])
    assert raised.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_domain_error_exits_with_message(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert cli.main(["explain", str(missing), "--sentence", "0", "--start", "0", "--end", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segflu explain: error:")
    assert str(missing) in error


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    output = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in output


def test_invalid_argument_exits_without_traceback(tmp_path, capsys):
    from tests.synthetic import make_corpus, write_conll

    source = write_conll(tmp_path / "small.conll", make_corpus(3, seed=5))
    assert cli.main(["convert", str(source), str(tmp_path / "missing" / "out.conll")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segflu convert: error:")
    assert str(tmp_path / "missing" / "out.conll") in error
    assert "not found" in error
    assert ".tmp" not in error


def test_convert_writes_jsonl_for_jsonl_suffix(tmp_path):
    import json

    from tests.synthetic import make_corpus, write_conll

    sentences = make_corpus(4, seed=6)
    source = write_conll(tmp_path / "small.conll", sentences)
    assert cli.main(["convert", str(source), str(tmp_path / "small.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "small.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [record["tokens"] for record in records] == [tokens for tokens, _ in sentences]
    assert [record["ner_tags"] for record in records] == [tags for _, tags in sentences]


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--case-embeddings"], True), (["--no-case-embeddings"], False)])
def test_train_case_embeddings_flag(flag, expected):
    from segflu_core.cli import build_parser

    args = build_parser().parse_args(["train", "--train", "a.conll", "--dev", "b.conll", "--out", "p", *flag])
    assert args.case_embeddings is expected
