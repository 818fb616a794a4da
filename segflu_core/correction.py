"""Retrain a project's tagger on its corrected (edited) labels.

:func:`retrain` trains on the training labels with the active edits of
``edits.sqlite`` applied, and evaluates against the edited dev and test
labels. ``mode="head"`` refits only the emission layer and the CRF on the
word features stored in the influence index, by L-BFGS
(:func:`segflu_core.influence.head.refit_head`), so the encoder never runs.
``mode="full"`` runs the normal training of ``segflu train`` with the
settings of ``project.json``. Either way the previous model and metrics stay
in ``model.previous/`` and ``metrics.previous.json``, ``metrics.json`` is
rewritten, and the index is rebuilt with the new model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from segflu_core.evaluation import evaluate
from segflu_core.influence.head import HeadParams, refit_head
from segflu_core.influence.index import build_index, decode, label_indices, make_batch
from segflu_core.project import Project, check_segment
from segflu_core.schemes import tags_to_spans
from segflu_core.tagger import write_json

logger = logging.getLogger(__name__)

MODES = ("head", "full")
MODEL_FOLDER = "model"
PREVIOUS_MODEL_FOLDER = "model.previous"
METRICS_FILE = "metrics.json"
PREVIOUS_METRICS_FILE = "metrics.previous.json"
EVALUATED_SPLITS = ("dev", "test")
# Sentences decoded at once when predicting from stored features.
DECODE_CHUNK = 256


def retrain(
    project_dir: str | os.PathLike,
    *,
    mode: str = "head",
    config=None,
    query: tuple[str, int, int, int] | None = None,
    l2: float = 1e-4,
    tolerance: float = 1e-5,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the project's tagger on the edited training labels and rebuild its index.

    Parameters
    ----------
    project_dir : str or os.PathLike
        A project folder with a trained model. ``mode="head"`` also needs a
        built index, whose features it trains on.
    mode : {"head", "full"}
        Refit the emission layer and CRF on the stored features, or train the
        whole tagger again.
    config : segflu_core.training.TrainConfig or None
        Settings of ``mode="full"``; ``None`` uses the ``training`` settings
        in ``project.json``. Ignored by ``mode="head"``.
    query : (split, sentence, start, end) or None
        An entity ``[start, end)`` whose prediction is compared before and after.
    l2, tolerance : float
        Penalty weight ``λ`` of ``(λ/2)‖θ‖²`` and the stopping tolerance on
        ``max|∇J|`` of the head refit.

    Returns
    -------
    dict
        ``mode`` is the mode. ``before`` and ``after`` contain, per dev and
        test split, the :func:`segflu_core.evaluation.evaluate` metrics
        (``per_type``, ``micro``, ``macro``, ``confusion``) of the old and
        new model against the edited labels. ``query`` is ``None`` or the
        entity's ``gold``, ``predicted_before`` and ``predicted_after`` tags
        with ``correct_before`` and ``correct_after``. ``training`` contains
        the refit information or the epoch history, and ``previous_model``
        the folder of the old model.
    """
    if mode not in MODES:
        raise ValueError(f"expected mode 'head' or 'full', got {mode!r}")
    project = Project.load(project_dir, device="cpu")
    if query is not None:
        check_query(project, query)
    if mode == "head":
        outcome = retrain_head(project, l2=l2, tolerance=tolerance, query=query)
    else:
        outcome = retrain_full(project, config=config, query=query, progress=progress)
    replace_model(project.path, outcome.pop("tagger"))
    write_json(project.path / METRICS_FILE, outcome["after"])
    rebuild_index(project.path, progress=progress)
    outcome["previous_model"] = str(project.path / PREVIOUS_MODEL_FOLDER)
    return {"mode": mode, **outcome}


def metrics_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per split and entity type (and ``micro``) with F1, precision and recall before and after retraining."""
    rows = []
    for split, after in result["after"].items():
        before = result["before"][split]
        for name in [*sorted(after["per_type"]), "micro"]:
            old = before["per_type"].get(name) if name != "micro" else before["micro"]
            new = after["per_type"][name] if name != "micro" else after["micro"]
            row = {"split": split, "type": name, "support": new["support"]}
            for metric in ("f1", "precision", "recall"):
                row[f"{metric} before"] = None if old is None else old[metric]
                row[f"{metric} after"] = new[metric]
            rows.append(row)
    return rows


def check_query(project: Project, query) -> None:
    """Raise ``ValueError`` unless ``query`` is ``(split, sentence, start, end)`` of a stored sentence."""
    if not isinstance(query, (tuple, list)) or len(query) != 4:
        raise ValueError(f"expected query (split, sentence, start, end), got {query!r}")
    split, sentence, start, end = query
    tokens = project.sentence(split, int(sentence)).tokens
    check_segment(int(start), int(end), len(tokens))


def retrain_head(project: Project, *, l2: float, tolerance: float, query) -> dict[str, Any]:
    """Refit the head on the index's training features and edited labels; return metrics and the new tagger."""
    index = project.index
    tagger = project.tagger
    old_head = HeadParams.from_tagger(tagger)
    offsets = np.asarray(index["train_sentence_offsets"])
    train_features = index.features("train")
    # shape per sentence: (n_i, d), float64 as refit_head requires
    features = [np.asarray(train_features[offsets[i] : offsets[i + 1]], dtype=np.float64) for i in range(len(offsets) - 1)]
    labels = label_indices([s.tags for s in project.sentences("train")], index.labels, split="train")
    logger.info("refitting the head on %d edited training sentences (l2=%g)", len(labels), l2)
    new_head, info = refit_head(old_head, features, labels, l2=l2, tolerance=tolerance)
    new_head.to_tagger(tagger)

    def predictor(head: HeadParams):
        return lambda split, sentences=None: stored_predictions(index, split, head, sentences=sentences)

    outcome = compare(project, predictor(old_head), predictor(new_head), query)
    return {**outcome, "training": info, "tagger": tagger}


def retrain_full(project: Project, *, config, query, progress: bool) -> dict[str, Any]:
    """Train a new tagger on the edited training and dev labels; return metrics and the new tagger."""
    from segflu_core.feature_cache import save_features
    from segflu_core.training import TrainConfig, train_tagger

    if config is None:
        settings = project.config.get("training", {})
        known = {field.name for field in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{key: value for key, value in settings.items() if key in known})
    pairs = {split: [(s.tokens, s.tags) for s in project.sentences(split)] for split in project.splits}
    old_tagger = project.tagger
    tagger, history = train_tagger(
        pairs["train"], pairs.get("dev", []), project.labels, encoder=project.config.get("encoder"),
        config=config, progress=progress,
    )
    if config.freeze_encoder:
        # The index rebuild reuses these instead of running the encoder again.
        save_features(project.path, tagger, {split: [tokens for tokens, _ in pairs[split]] for split in pairs},
                      batch_size=config.batch_size)

    def predictor(model):
        def predict(split: str, sentences: list[int] | None = None) -> list[list[str]]:
            chosen = range(len(pairs[split])) if sentences is None else sentences
            return model.predict([list(pairs[split][i][0]) for i in chosen], batch_size=config.batch_size)

        return predict

    outcome = compare(project, predictor(old_tagger), predictor(tagger), query)
    return {**outcome, "training": history, "tagger": tagger}


def stored_predictions(index, split: str, head: HeadParams, *, sentences: list[int] | None = None) -> list[list[str]]:
    """Decode sentences of a split (all by default) from the index's stored features with ``head``.

    Returns the IOB2 tags of each sentence, in the order of ``sentences``.
    """
    offsets = np.asarray(index[f"{split}_sentence_offsets"])
    features = index.features(split)
    labels = index.labels
    order = list(range(len(offsets) - 1)) if sentences is None else [int(i) for i in sentences]
    predictions: list[list[str]] = []
    for first in range(0, len(order), DECODE_CHUNK):
        chunk = [features[offsets[i] : offsets[i + 1]] for i in order[first : first + DECODE_CHUNK]]
        placeholder = [np.zeros(len(words), dtype=np.int64) for words in chunk]
        flat = decode(make_batch(chunk, placeholder, head), labels).tolist()
        ends = np.cumsum([len(words) for words in chunk])
        predictions.extend([labels[k] for k in flat[end - len(words) : end]] for words, end in zip(chunk, ends))
    return predictions


def compare(project: Project, predict_before, predict_after, query) -> dict[str, Any]:
    """Evaluate the old and new predictions on the edited dev and test labels, and the query entity.

    ``predict_before(split, sentences=None)`` and ``predict_after`` return the
    IOB2 tags of the listed sentences of a split, or of all of them.
    """
    before, after = {}, {}
    for split in EVALUATED_SPLITS:
        if split not in project.splits or not project.sentences(split):
            continue
        gold = [s.tags for s in project.sentences(split)]
        before[split] = evaluate(gold, predict_before(split))
        after[split] = evaluate(gold, predict_after(split))
    query_result = None
    if query is not None:
        split, sentence, start, end = query
        gold = project.sentence(split, int(sentence)).tags
        old_tags = predict_before(split, [int(sentence)])[0]
        new_tags = predict_after(split, [int(sentence)])[0]
        query_result = {
            "split": split, "sentence": int(sentence), "start": int(start), "end": int(end),
            "gold": gold[int(start) : int(end)],
            "predicted_before": old_tags[int(start) : int(end)],
            "predicted_after": new_tags[int(start) : int(end)],
            "correct_before": entity_correct(gold, old_tags, int(start), int(end)),
            "correct_after": entity_correct(gold, new_tags, int(start), int(end)),
        }
    return {"before": before, "after": after, "query": query_result}


def entity_correct(gold: list[str], predicted: list[str], start: int, end: int) -> bool:
    """Return whether ``predicted`` has exactly the gold tags in ``[start, end)`` and the same spans touching it.

    An entity that continues past ``end`` in one sequence but not the other
    counts as wrong, because its bounds differ.
    """
    def touching(tags: list[str]) -> set[tuple[int, int, str]]:
        return {(s.start, s.end, s.label) for s in tags_to_spans(tags, "iob2") if s.start < end and start < s.end}

    return list(gold[start:end]) == list(predicted[start:end]) and touching(gold) == touching(predicted)


def replace_model(project_dir: Path, tagger) -> None:
    """Save ``tagger`` as ``model/``, keeping the old model and metrics as ``model.previous/`` and ``metrics.previous.json``."""
    project_dir = Path(project_dir)
    staged = project_dir / f".{MODEL_FOLDER}.new-{os.getpid()}"
    if staged.exists():
        shutil.rmtree(staged)
    tagger.save(staged)
    previous = project_dir / PREVIOUS_MODEL_FOLDER
    if previous.exists():
        shutil.rmtree(previous)
    (project_dir / MODEL_FOLDER).rename(previous)
    staged.rename(project_dir / MODEL_FOLDER)
    metrics = project_dir / METRICS_FILE
    if metrics.is_file():
        os.replace(metrics, project_dir / PREVIOUS_METRICS_FILE)
    logger.info("saved the retrained model to %s; the previous one is in %s", project_dir / MODEL_FOLDER, previous)


def rebuild_index(project_dir: Path, *, progress: bool) -> None:
    """Rebuild the index with the new model, keeping the Hessian option and ``l2`` of the old index when there is one.

    NOTE: without saved features (``PROJECT/features``, written for frozen
    encoders) the rebuild runs the encoder over every split.
    """
    manifest_path = Path(project_dir) / "index" / "manifest.json"
    options: dict[str, Any] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        options = {"hessian": bool(manifest.get("hessian")), "l2": float(manifest.get("l2", 1e-4))}
    build_index(Project.load(project_dir, device="cpu"), progress=progress, **options)
