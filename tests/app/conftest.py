"""A tiny trained and indexed project for the app tests, built once per test session."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tests.synthetic import make_corpus, write_conll

# Tokens that must reach the browser as text, never as markup.
HOSTILE_TOKENS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]
# The training file without the injected label noise, beside the project folder.
CLEAN_TRAIN_NAME = "train.clean.conll"


def hostile_sentence() -> tuple[list[str], list[str]]:
    """Return a sentence whose person name and filler words are HTML injections."""
    tokens = ["Alice", "said", HOSTILE_TOKENS[0], "in", "Paris", HOSTILE_TOKENS[1], "."]
    tags = ["B-PER", "O", "O", "O", "B-LOC", "O", "O"]
    return tokens, tags


def flip_city_labels(corpus: list, *, fraction: float, seed: int) -> list:
    """Relabel a fraction of the LOC words as PER, so the training data contains conflicting annotations."""
    rng = random.Random(seed)
    noisy = []
    for tokens, tags in corpus:
        if "B-LOC" in tags and rng.random() < fraction:
            tags = ["B-PER" if tag == "B-LOC" else tag for tag in tags]
        noisy.append((tokens, tags))
    return noisy


def build_tiny_project(folder: Path, encoder: Path) -> Path:
    """Train a frozen tiny encoder with a CRF head for a few epochs on generated data, then index it."""
    from segflu_core.demo import build_index
    from segflu_core.training import TrainConfig, train_project

    corpus = make_corpus(90, seed=3)
    data_dir = folder / "data"
    data_dir.mkdir()
    clean_train = corpus[:60] + [hostile_sentence()]
    noisy_train = flip_city_labels(corpus[:60], fraction=0.3, seed=4) + [hostile_sentence()]
    # Documents of five sentences give the noise ranking something to rank;
    # the clean copy is the ground truth of which documents are noisy.
    write_conll(data_dir / "train.conll", noisy_train, docstart_every=5)
    write_conll(data_dir / CLEAN_TRAIN_NAME, clean_train, docstart_every=5)
    write_conll(data_dir / "dev.conll", corpus[60:75])
    write_conll(data_dir / "test.conll", [hostile_sentence()] + corpus[75:])
    project_dir = folder / "project"
    config = TrainConfig(freeze_encoder=True, head_epochs=4, batch_size=8, seed=0, device="cpu")
    train_project(
        data_dir / "train.conll", data_dir / "dev.conll", data_dir / "test.conll", project_dir,
        encoder=str(encoder), config=config, progress=False,
    )
    build_index(project_dir, progress=False)
    return project_dir


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_encoder) -> Path:
    """Folder of a trained and indexed project on a generated corpus (read-only for tests)."""
    return build_tiny_project(tmp_path_factory.mktemp("tiny-project"), tiny_encoder)


def clean_train_file(project_dir: Path) -> Path:
    """Return the clean copy of a tiny project's training file."""
    return project_dir.parent / "data" / CLEAN_TRAIN_NAME


@pytest.fixture
def project_copy(tiny_project, tmp_path) -> Path:
    """A private copy of the tiny project that a test may write edits to."""
    return Path(shutil.copytree(tiny_project, tmp_path / "project"))
