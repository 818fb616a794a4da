"""Tests of the app's helpers that need no running app: filters, pairing, tables, the start command."""

from __future__ import annotations

import argparse
import sys

import pandas as pd
import pytest

from pages.errors import filter_errors
from pages.explain import disagreeing_pairs, span_options
from pages.noise import fraction_found, noisy_documents
from pages.project import confusion_frame, metrics_table
from segflu_core.commands import app as app_command
from segflu_core.errors import ProjectError


def items(golds: list[str], scores: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"gold": golds, "score": scores})


def test_pairs_match_different_types():
    supporting = items(["B-PER", "B-LOC", "O"], [-3.0, -2.0, -1.0])
    opposing = items(["I-PER", "O", "B-LOC"], [3.0, 2.0, 1.0])

    pairs = disagreeing_pairs(supporting, opposing)

    # B-PER and I-PER share a type, so PER pairs with O; LOC takes the next
    # free item of another type; O has only LOC left.
    assert pairs == [(0, 1), (1, 0), (2, 2)]


def test_pairs_use_each_item_once():
    supporting = items(["B-PER", "B-PER"], [-2.0, -1.0])
    opposing = items(["O"], [1.0])

    assert disagreeing_pairs(supporting, opposing) == [(0, 0)]


def test_pairs_respect_limit():
    supporting = items(["B-PER"] * 5, [-1.0] * 5)
    opposing = items(["O"] * 5, [1.0] * 5)

    assert len(disagreeing_pairs(supporting, opposing, limit=2)) == 2


def test_pairs_none_when_types_agree():
    assert disagreeing_pairs(items(["B-PER"], [-1.0]), items(["I-PER"], [1.0])) == []


def test_span_options_merge_layers():
    options = span_options([(0, 2, "PER"), (3, 4, "LOC")], [(0, 2, "ORG")])

    assert list(options) == [(0, 2), (3, 4)]
    assert options[(0, 2)] == "[0, 2) gold PER, predicted ORG"
    assert options[(3, 4)] == "[3, 4) gold LOC"


def test_filter_errors_combines_conditions():
    errors = pd.DataFrame(
        {
            "gold_type": ["PER", "O", "LOC", "ORG"],
            "predicted_type": ["O", "PER", "ORG", "ORG"],
            "kind": ["missed", "spurious", "wrong type", "wrong boundary"],
            "text": ["Alice", "Bob", "Paris", "Acme Corp"],
        }
    )

    assert list(filter_errors(errors, types=["PER"], kinds=[], text="").index) == [0, 1]
    assert list(filter_errors(errors, types=["ORG"], kinds=["wrong type"], text="").index) == [2]
    assert list(filter_errors(errors, types=[], kinds=[], text="corp").index) == [3]
    assert len(filter_errors(errors, types=[], kinds=[], text="")) == 4


def test_metrics_table_rows():
    split_metrics = {
        "per_type": {"LOC": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 2}},
        "micro": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 2},
        "macro": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 2},
    }

    table = metrics_table(split_metrics)

    assert list(table["type"]) == ["LOC", "micro average", "macro average"]
    assert table.loc[0, "f1"] == pytest.approx(2 / 3)
    assert table.loc[0, "support"] == 2


def test_confusion_frame_counts():
    frame = confusion_frame({"LOC": {"LOC": 3, "missed": 1}, "spurious": {"PER": 2}})

    assert sorted(map(tuple, frame.values.tolist())) == [("LOC", "LOC", 3), ("LOC", "missed", 1), ("spurious", "PER", 2)]


def test_streamlit_command_defaults():
    command = app_command.streamlit_command(["--server.port", "8502"])

    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(app_command.APP_SCRIPT)]
    options = command[5:]
    assert options[options.index("--server.address") + 1] == "127.0.0.1"
    assert options[options.index("--browser.gatherUsageStats") + 1] == "false"
    assert options[options.index("--server.maxUploadSize") + 1] == "50"
    assert options[-2:] == ["--server.port", "8502"]


def test_error_links_turned_off():
    import tomllib

    from streamlit import config as streamlit_config

    command = app_command.streamlit_command([])
    settings = tomllib.loads((app_command.REPO_ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))

    assert "client.showErrorLinks" in streamlit_config.get_config_options()
    assert command[command.index("--client.showErrorLinks") + 1] == "false"
    assert settings["client"]["showErrorLinks"] is False


@pytest.mark.parametrize("given", [["--server.address", "0.0.0.0"], ["--server.address=0.0.0.0"]])
def test_streamlit_command_keeps_user_address(given):
    command = app_command.streamlit_command(given)

    assert "127.0.0.1" not in command
    assert command[-len(given):] == given
    assert sum(argument.startswith("--server.address") for argument in command) == 1


def test_app_command_passes_project(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(app_command.subprocess, "call", lambda command, env: calls.append((command, env)) or 0)

    code = app_command.run(argparse.Namespace(project=str(tmp_path), streamlit_args=["--server.headless", "true"]))

    assert code == 0
    command, env = calls[0]
    assert env[app_command.PROJECT_ENV] == str(tmp_path.resolve())
    assert command[-2:] == ["--server.headless", "true"]


def test_app_command_rejects_missing_folder(tmp_path):
    with pytest.raises(ProjectError, match="not found"):
        app_command.resolve_project(str(tmp_path / "missing"))


def test_app_command_builds_demo_without_project(monkeypatch, tmp_path):
    import segflu_core.demo

    monkeypatch.setattr(segflu_core.demo, "ensure_demo_project", lambda progress: tmp_path)

    assert app_command.resolve_project(None) == tmp_path


def test_fraction_found_steps():
    curve = fraction_found([3, 1, 2, 0], {1, 0})

    assert list(curve["inspected"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert list(curve["found"]) == [0.0, 0.0, 0.5, 0.5, 1.0]


class Sentence:
    def __init__(self, tokens, tags, doc):
        self.tokens, self.tags, self.doc = tokens, tags, doc


def test_noisy_documents_compare_tags():
    train = [Sentence(["a"], ["O"], 0), Sentence(["b"], ["B-PER"], 1), Sentence(["c"], ["O"], 1)]
    reference = [Sentence(["a"], ["O"], 0), Sentence(["b"], ["B-PER"], 1), Sentence(["c"], ["B-LOC"], 1)]

    assert noisy_documents(train, reference) == {1}


def test_noisy_documents_reject_other_file():
    train = [Sentence(["a"], ["O"], 0)]

    with pytest.raises(ValueError, match="1 sentences"):
        noisy_documents(train, [])
    with pytest.raises(ValueError, match="same tokens"):
        noisy_documents(train, [Sentence(["z"], ["O"], 0)])


def test_tokenize_drops_whitespace():
    from pages.explain import tokenize

    assert tokenize("Alice  met\n\nBob in Paris .") == ["Alice", "met", "Bob", "in", "Paris", "."]


def test_tokenizer_prefers_installed_pipeline():
    import importlib.util

    from pages.explain import SPACY_PIPELINES, load_tokenizer

    installed = [name for name in SPACY_PIPELINES if importlib.util.find_spec(name) is not None]
    nlp = load_tokenizer()

    if installed:
        assert nlp.meta["name"].startswith("core_web_sm")
    else:
        assert not nlp.meta["name"].startswith("core_web_sm")
    assert nlp.pipe_names == []
