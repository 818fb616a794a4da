"""The index, explain and rank commands against the Project API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from segflu_core.cli import main
from segflu_core.project import Project
from tests.test_index import indexed_project  # noqa: F401


def run_json(capsys, argv: list[str]):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"method": "nn-cosine", "label_filter": "different"},
        {"granularity": "span", "labels": "predicted", "hessian": True},
        {"method": "instance"},
    ],
)
def test_explain_json_equals_project_rows(indexed_project, capsys, options):
    argv = ["explain", str(indexed_project.path), "--split", "test", "--sentence", "3", "--start", "0", "--end", "2", "--top-k", "4", "--json"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, value]
    rows = run_json(capsys, argv)
    expected = indexed_project.explain("test", 3, 0, 2, top_k=4, **options)
    assert rows == expected.to_dict(orient="records")


def test_explain_text_output(indexed_project, capsys):
    assert main(["explain", str(indexed_project.path), "--sentence", "0", "--start", "0", "--end", "1", "--top-k", "2"]) == 0
    output = capsys.readouterr().out
    assert "supporting" in output or "opposing" in output
    assert output.splitlines()[0].split() == ["sentence", "doc", "start", "end", "tokens", "gold", "score", "role", "conflict"]


def test_explain_without_index_fails_with_message(indexed_project, tmp_path, capsys):
    shutil.copytree(indexed_project.path, tmp_path / "copy", ignore=shutil.ignore_patterns("index"))
    code = main(["explain", str(tmp_path / "copy"), "--sentence", "0", "--start", "0", "--end", "1"])
    assert code == 2
    assert "segflu index" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["word-loss", "segment-influence", "instance-influence"])
def test_rank_json_equals_project_ranking(indexed_project, capsys, method):
    rows = run_json(capsys, ["rank", str(indexed_project.path), "--method", method, "--aggregate", "mean", "--json"])
    expected = indexed_project.rank_noise(method, aggregate="mean")
    assert rows == expected.to_dict(orient="records")


def test_rank_with_clean_docs_file(indexed_project, capsys):
    path = indexed_project.data_path("dev")
    rows = run_json(capsys, ["rank", str(indexed_project.path), "--method", "nn", "--clean-docs", str(path), "--top", "2", "--json"])
    expected = indexed_project.rank_noise("nn", clean_docs=str(path)).head(2)
    assert [row["doc"] for row in rows] == list(expected.doc)


def test_index_command_builds_index(indexed_project, tmp_path, capsys):
    shutil.copytree(indexed_project.path, tmp_path / "copy", ignore=shutil.ignore_patterns("index"))
    assert main(["index", str(tmp_path / "copy"), "--device", "cpu", "--batch-size", "4", "--chunk-sentences", "9"]) == 0
    assert "training words" in capsys.readouterr().out
    copy = Project.load(tmp_path / "copy")
    np.testing.assert_allclose(copy.index["train_word_residuals"], indexed_project.index["train_word_residuals"], atol=1e-5)
    assert not copy.index.has("hessian_factor")


def test_validate_writes_pairs_summary_and_chart(indexed_project, tmp_path, capsys):
    from segflu_core.commands.validate import split_sample
    from segflu_core.influence.head import HeadParams, refit_head
    from segflu_core.influence.scores import segment_gradient

    out = tmp_path / "validation"
    argv = ["validate", str(indexed_project.path), "--train-sentences", "8", "--dev-sentences", "6",
            "--test-words", "2", "--top", "2", "--tolerance", "1e-5", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"pearson", "spearman", "sign_agreement", "n"}
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vega" in (out / "scatter.html").read_text()
    import pandas as pd

    pairs = pd.read_csv(out / "pairs.csv")
    group_sizes = pairs.groupby(["test_sentence", "test_start"]).size().tolist()
    assert 1 <= len(group_sizes) <= 2
    assert group_sizes == [2] * len(group_sizes)
    assert summary["n"] == len(pairs)

    # Each listed training word is among the 2 largest |influence| on its test word.
    train = split_sample(indexed_project, "train", 8)
    dev = split_sample(indexed_project, "dev", 6)
    params, _ = refit_head(HeadParams.from_tagger(indexed_project.tagger), *train, l2=1e-4, tolerance=1e-5)
    words = [(s, t) for s in range(len(train[1])) for t in range(len(train[1][s]))]
    for (sentence, start), group in pairs.groupby(["test_sentence", "test_start"]):
        query = segment_gradient(dev[0][sentence], dev[1][sentence], params, start, start + 1).flatten()
        influence = {
            (s, t): abs(query @ segment_gradient(train[0][s], train[1][s], params, t, t + 1).flatten())
            for s, t in words
        }
        threshold = sorted(influence.values())[-2]
        for row in group.itertuples():
            assert influence[(row.train_sentence, row.train_start)] >= threshold * (1 - 1e-6)
