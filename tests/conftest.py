"""Shared fixtures: the research corpora beside the checkout, and tiny generated models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.synthetic import make_tiny_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]

# Research-only corpora are never committed. They are read from a folder beside
# the checkout, or from SEGFLU_SHARED_DATA, and the tests that need them skip
# with this message when the folder is missing.
SHARED_DATA = Path(os.environ.get("SEGFLU_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Return a file of the shared research corpora, or skip the test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"research corpus not found at {path}; set SEGFLU_SHARED_DATA to its folder to run this test")
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """Folder of a randomly initialised one-layer BERT with a word-level uncased vocabulary."""
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))
