"""Word features of a frozen encoder, saved with the project so the index need not recompute them.

With a frozen encoder, training already runs the encoder over every split.
:func:`save_features` stores those features in ``PROJECT/features/`` as
float16 ``{split}.npy`` arrays of shape ``(num_words, feature_dim)``, the
sentences concatenated in file order, plus ``manifest.json``. The index
builder takes them from there through :func:`load_features`, which returns
them only when the encoder and the split's tokens are those they were
computed from. Fine-tuned encoders have no saved features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from segflu_core.conll import atomic_write_bytes

logger = logging.getLogger(__name__)

FEATURES_FOLDER = "features"
MANIFEST_NAME = "manifest.json"


def tokens_digest(token_lists: Sequence[Sequence[str]]) -> str:
    """SHA-256 of a split's tokens, with sentence and token boundaries encoded."""
    digest = hashlib.sha256()
    for tokens in token_lists:
        for token in tokens:
            encoded = token.encode("utf-8")
            digest.update(len(encoded).to_bytes(4, "little"))
            digest.update(encoded)
        digest.update(b"\xff\xff\xff\xff")
    return digest.hexdigest()


def save_features(project_dir: str | os.PathLike, tagger, splits: dict[str, Sequence[Sequence[str]]], *, batch_size: int = 32) -> Path:
    """Write the word features of each split to ``project_dir/features`` and return the folder.

    Call it with a tagger whose feature cache already contains the splits (see
    :meth:`segflu_core.tagger.Tagger.enable_feature_cache`); sentences that are
    not cached go through the encoder.

    Raises
    ------
    ValueError
        For a tagger whose encoder is fine-tuned.
    """
    if tagger.fine_tune_encoder:
        raise ValueError("expected a tagger with a frozen encoder, got fine_tune_encoder=True")
    folder = Path(project_dir) / FEATURES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"encoder": tagger.encoder_origin, "feature_dim": tagger.encoder.feature_dim, "splits": {}}
    for split, token_lists in splits.items():
        features = tagger.word_features(token_lists, batch_size=batch_size, progress=False)
        # shape: (num_words, feature_dim), sentences concatenated in file order
        stacked = np.concatenate(features, axis=0) if features else np.zeros((0, manifest["feature_dim"]))
        np.save(folder / f"{split}.npy", stacked.astype(np.float16))
        manifest["splits"][split] = {"words": int(stacked.shape[0]), "tokens_sha256": tokens_digest(token_lists)}
    atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    logger.info("saved word features of %s to %s", ", ".join(splits), folder)
    return folder


def load_features(project_dir: str | os.PathLike, split: str, token_lists: Sequence[Sequence[str]], tagger) -> np.ndarray | None:
    """Return the saved float16 features of ``split``, or ``None`` when they do not apply.

    They apply when the tagger's encoder is frozen and is the one they were
    computed with, and ``token_lists`` are the tokens they were computed for.
    The array is memory-mapped, shape ``(num_words, feature_dim)``.
    """
    folder = Path(project_dir) / FEATURES_FOLDER
    manifest_path = folder / MANIFEST_NAME
    if tagger.fine_tune_encoder or not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    entry = manifest.get("splits", {}).get(split)
    if entry is None or manifest.get("encoder") != tagger.encoder_origin:
        return None
    if manifest.get("feature_dim") != tagger.encoder.feature_dim or entry["tokens_sha256"] != tokens_digest(token_lists):
        logger.warning("saved features of %s in %s do not match the project; computing them again", split, folder)
        return None
    features = np.load(folder / f"{split}.npy", mmap_mode="r")
    if features.shape != (entry["words"], tagger.encoder.feature_dim):
        logger.warning("saved features %s have shape %s, expected %s; computing them again",
                       folder / f"{split}.npy", features.shape, (entry["words"], tagger.encoder.feature_dim))
        return None
    return features
