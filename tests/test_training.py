"""Tests of evaluation, the training loop, project folders and ``segflu train``."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score
from seqeval.scheme import IOB2

from segflu_core.cli import main
from segflu_core.conll import read_corpus
from segflu_core.errors import ProjectError
from segflu_core.evaluation import evaluate
from segflu_core.tagger import Tagger
from segflu_core.training import TrainConfig, linear_schedule, train_project
from tests.synthetic import make_corpus, write_conll

TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def perturb(tags: list[str], rng: random.Random) -> list[str]:
    """Replace about a quarter of the tags with random ones, invalid IOB2 sequences included."""
    return [rng.choice(TAGS) if rng.random() < 0.25 else tag for tag in tags]


def test_evaluate_matches_seqeval():
    rng = random.Random(0)
    gold = [tags for _, tags in make_corpus(60, seed=7)]
    predicted = [perturb(tags, rng) for tags in gold]
    result = evaluate(gold, predicted)
    for average in ("micro", "macro"):
        options = {"mode": "strict", "scheme": IOB2, "average": average, "zero_division": 0}
        assert result[average]["precision"] == pytest.approx(precision_score(gold, predicted, **options))
        assert result[average]["recall"] == pytest.approx(recall_score(gold, predicted, **options))
        assert result[average]["f1"] == pytest.approx(f1_score(gold, predicted, **options))
    per_type_f1 = f1_score(gold, predicted, mode="strict", scheme=IOB2, average=None, zero_division=0)
    assert [result["per_type"][kind]["f1"] for kind in ("LOC", "ORG", "PER")] == pytest.approx(list(per_type_f1))


def test_evaluate_hand_counted_case():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC"],
        ["O", "B-ORG", "I-ORG", "O"],
        ["B-LOC", "O"],
    ]
    predicted = [
        ["B-PER", "I-PER", "O", "B-ORG"],  # PER right; LOC predicted as ORG
        ["O", "B-ORG", "O", "O"],  # ORG boundary wrong: one miss, one spurious
        ["B-LOC", "B-PER"],  # LOC right; PER spurious
    ]
    result = evaluate(gold, predicted)
    # Gold: PER 1, LOC 2, ORG 1. Predicted: PER 2, ORG 2, LOC 1. Correct: PER 1, LOC 1.
    assert result["per_type"]["PER"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert result["per_type"]["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert result["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["micro"]["precision"] == pytest.approx(2 / 5)
    assert result["micro"]["recall"] == pytest.approx(2 / 4)
    assert result["micro"]["support"] == 4
    assert result["macro"]["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)
    assert result["confusion"] == {
        "LOC": {"LOC": 1, "ORG": 1},
        "ORG": {"missed": 1},
        "PER": {"PER": 1},
        "spurious": {"ORG": 1, "PER": 1},
    }


def test_evaluate_checks_lengths():
    with pytest.raises(ValueError, match="expected 2 predicted tags"):
        evaluate([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="as many predicted sentences"):
        evaluate([["O"]], [])
    assert evaluate([["O"]], [["O"]])["micro"]["f1"] == 0.0


def test_train_config_checks():
    assert TrainConfig().head_lr == 1e-3
    assert TrainConfig(freeze_encoder=True).head_lr > 1e-3
    for bad in ({"epochs": 0}, {"batch_size": -1}, {"encoder_lr": 0.0}, {"dropout": 1.5}, {"warmup_ratio": 2.0},
                {"device": "tpu"}, {"max_train_sentences": 0}, {"weight_decay": -1.0},
                {"case_embeddings": True, "freeze_encoder": True}, {"case_embeddings": "yes"}):
        with pytest.raises(ValueError, match="expected"):
            TrainConfig(**bad)


def test_linear_schedule_warms_up_and_decays():
    factor = linear_schedule(10, 0.2)
    assert [factor(step) for step in range(10)] == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def write_splits(folder, *, train_size=200, dev_size=50):
    corpus = make_corpus(train_size + dev_size + 30, seed=11)
    paths = {
        "train": write_conll(folder / "train.conll", corpus[:train_size], docstart_every=50),
        "dev": write_conll(folder / "dev.conll", corpus[train_size : train_size + dev_size]),
        "test": write_conll(folder / "test.conll", corpus[train_size + dev_size :]),
    }
    return paths


def file_hashes(paths) -> dict[str, str]:
    return {split: hashlib.sha256(path.read_bytes()).hexdigest() for split, path in paths.items()}


def check_project(out, paths, hashes, config):
    """Check the files of a project folder against its inputs and reload its tagger."""
    assert file_hashes(paths) == hashes
    project = json.loads((out / "project.json").read_text())
    assert project["format_version"] == 1
    assert project["labels"] == TAGS
    assert project["freeze_encoder"] == config.freeze_encoder
    assert project["training"] == config.to_dict()
    for split, path in paths.items():
        entry = project["data"][split]
        assert entry["path"] == f"data/{split}.conll"
        assert entry["source"] == str(path.resolve())
        assert (entry["format"], entry["tag_column"], entry["encoding"], entry["scheme"]) == ("conll", -1, "utf-8", "iob2")
        assert (out / entry["path"]).read_bytes() == path.read_bytes()
    for name in ("config.json", "labels.json", "head.safetensors"):
        assert (out / "model" / name).is_file()
    assert (out / "model" / "encoder").is_dir() == (not config.freeze_encoder)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"dev", "test"}

    dev = read_corpus(paths["dev"])
    tagger = Tagger.load(out / "model")
    predicted = tagger.predict([sentence.tokens for sentence in dev.sentences])
    # The saved metrics come from the tagger before saving, so equal scores,
    # per-type counts and confusion counts show the reloaded one predicts alike.
    assert evaluate([sentence.tags for sentence in dev.sentences], predicted) == metrics["dev"]
    return metrics


def test_fine_tuned_project(tiny_encoder, tmp_path):
    paths = write_splits(tmp_path)
    hashes = file_hashes(paths)
    # The tiny random encoder needs larger learning rates than a pretrained one.
    config = TrainConfig(epochs=4, batch_size=8, encoder_lr=1e-3, head_lr=3e-2, warmup_ratio=0.0, device="cpu")
    result = train_project(paths["train"], paths["dev"], paths["test"], tmp_path / "project",
                           encoder=str(tiny_encoder), config=config, progress=False)
    assert len(result["history"]) == 4
    assert result["metrics"]["dev"]["micro"]["f1"] >= 0.95
    assert result["metrics"]["dev"]["micro"]["f1"] == max(record["dev_f1"] for record in result["history"])
    metrics = check_project(tmp_path / "project", paths, hashes, config)
    assert metrics["dev"]["micro"]["f1"] >= 0.95


def test_frozen_project(tiny_encoder, tmp_path):
    paths = write_splits(tmp_path)
    hashes = file_hashes(paths)
    config = TrainConfig(freeze_encoder=True, head_epochs=25, device="cpu")
    result = train_project(paths["train"], paths["dev"], paths["test"], tmp_path / "project",
                           encoder=str(tiny_encoder), config=config, progress=False)
    assert len(result["history"]) == 25
    metrics = check_project(tmp_path / "project", paths, hashes, config)
    assert metrics["dev"]["micro"]["f1"] >= 0.95


def test_project_folder_not_overwritten(tiny_encoder, tmp_path):
    paths = write_splits(tmp_path, train_size=20, dev_size=5)
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    config = TrainConfig(freeze_encoder=True, head_epochs=1, max_train_sentences=10, device="cpu")
    with pytest.raises(ProjectError, match="not empty"):
        train_project(paths["train"], paths["dev"], None, out, encoder=str(tiny_encoder), config=config, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_train_command_end_to_end(tiny_encoder, tmp_path, capsys):
    paths = write_splits(tmp_path, train_size=60, dev_size=20)
    out = tmp_path / "project"
    arguments = ["train", "--train", str(paths["train"]), "--dev", str(paths["dev"]), "--test", str(paths["test"]),
                 "--out", str(out), "--encoder", str(tiny_encoder), "--freeze-encoder", "--head-epochs", "3",
                 "--device", "cpu", "--max-train-sentences", "40", "--seed", "3"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "dev: precision" in printed
    assert "test: precision" in printed
    project = json.loads((out / "project.json").read_text())
    assert project["training"]["max_train_sentences"] == 40
    assert project["training"]["seed"] == 3
    assert project["training"]["head_epochs"] == 3

    assert main(arguments) == 2
    assert "--force" in capsys.readouterr().err
    (out / "index").mkdir()
    assert main(arguments + ["--force"]) == 0
    assert not (out / "index").exists()
    assert (out / "project.json").is_file()


def test_train_command_rejects_bad_option(tiny_encoder, tmp_path, capsys):
    paths = write_splits(tmp_path, train_size=10, dev_size=5)
    arguments = ["train", "--train", str(paths["train"]), "--dev", str(paths["dev"]), "--out", str(tmp_path / "p"),
                 "--encoder", str(tiny_encoder), "--epochs", "0"]
    assert main(arguments) == 2
    assert "epochs" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

    missing = arguments[:2] + [str(tmp_path / "missing.conll")] + arguments[3:-2]
    assert main(missing) == 2
    assert "missing.conll" in capsys.readouterr().err


def test_train_command_rejects_missing_cuda(tiny_encoder, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available on this machine")
    paths = write_splits(tmp_path, train_size=10, dev_size=5)
    arguments = ["train", "--train", str(paths["train"]), "--dev", str(paths["dev"]), "--out", str(tmp_path / "p"),
                 "--encoder", str(tiny_encoder), "--device", "cuda"]
    assert main(arguments) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_train_help_states_config_defaults():
    import argparse

    from segflu_core.commands.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = TrainConfig()
    for action in parser._actions:
        name = action.dest
        if name in ("epochs", "head_epochs", "batch_size", "seed"):
            assert f"(default: {getattr(defaults, name)})" in action.help, name


def test_shuffled_batches_cover_every_index_once():
    import random

    from segflu_core.training import shuffled_batches

    sizes = [random.Random(7).randint(1, 60) for _ in range(1000)]
    batches = list(shuffled_batches(sizes, 16, random.Random(3), pool_batches=10))
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(1000))
    assert all(1 <= len(batch) <= 16 for batch in batches)
    # Sorting within pools keeps the padding small: most batches span a narrow length range.
    spreads = sorted(max(sizes[i] for i in batch) - min(sizes[i] for i in batch) for batch in batches)
    assert spreads[len(spreads) // 2] <= 6
    other_order = [index for batch in shuffled_batches(sizes, 16, random.Random(4), pool_batches=10) for index in batch]
    assert other_order != flat
