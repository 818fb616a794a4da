"""Training a :class:`~segflu_core.tagger.Tagger` and writing a project folder.

Two modes exist. Fine-tuning trains encoder and head together with AdamW, a
linear warmup and decay, gradient clipping, and keeps the epoch with the best
dev F1. With a frozen encoder the word features are computed once, and only
dropout, the emission layer and the CRF are trained on them, which takes
seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from segflu_core.errors import ProjectError, TagSchemeError
from segflu_core.evaluation import evaluate
from segflu_core.feature_cache import FEATURES_FOLDER, save_features
from segflu_core.schemes import entity_types, label_list
from segflu_core.tagger import Tagger, pad_features, write_json

logger = logging.getLogger(__name__)

# (tokens, IOB2 tags) per sentence
SentencePairs = Sequence[tuple[Sequence[str], Sequence[str]]]

DEFAULT_HEAD_LR = 1e-3
# Only the head learns in frozen mode, from fixed features, so a larger step
# size converges within the head epochs.
DEFAULT_FROZEN_HEAD_LR = 1e-2


@dataclass
class TrainConfig:
    """Settings of one training run; ``help`` in each field's metadata describes it.

    NOTE: ``head_lr=None`` is replaced by its default at construction, so
    ``dataclasses.replace(config, freeze_encoder=True)`` keeps the old rate.
    """

    epochs: int = field(default=3, metadata={"help": "passes over the training sentences when fine-tuning"})
    batch_size: int = field(default=16, metadata={"help": "sentences per optimisation step"})
    encoder_lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate of the encoder"})
    head_lr: float | None = field(
        default=None,
        metadata={"help": f"AdamW learning rate of emission layer and CRF; default {DEFAULT_HEAD_LR}, "
                  f"or {DEFAULT_FROZEN_HEAD_LR} with a frozen encoder"},
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linearly rising learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of weight matrices"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 disables clipping"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability on word features"})
    seed: int = field(default=13, metadata={"help": "seed of torch, numpy and random"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu' or 'cuda'"})
    freeze_encoder: bool = field(default=False, metadata={"help": "train only the head on fixed word features"})
    max_train_sentences: int | None = field(
        default=None, metadata={"help": "use only the first N training sentences; None uses all"}
    )
    head_epochs: int = field(default=60, metadata={"help": "passes over the cached features with a frozen encoder"})
    case_embeddings: bool | None = field(
        default=None,
        metadata={"help": "pass each word's case to the encoder as its token type id when fine-tuning; "
                  "None does so when the tokenizer lowercases and the encoder has token type embeddings"},
    )

    def __post_init__(self) -> None:
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size, "head_epochs": self.head_epochs}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} to be a positive integer, got {value!r}")
        if self.max_train_sentences is not None and (
            isinstance(self.max_train_sentences, bool)
            or not isinstance(self.max_train_sentences, int)
            or self.max_train_sentences < 1
        ):
            raise ValueError(f"expected max_train_sentences to be a positive integer or None, got {self.max_train_sentences!r}")
        if self.case_embeddings not in (None, True, False):
            raise ValueError(f"expected case_embeddings True, False or None, got {self.case_embeddings!r}")
        if self.case_embeddings and self.freeze_encoder:
            raise ValueError("expected case_embeddings=False with freeze_encoder=True: the case embeddings start "
                             "untrained and only fine-tuning the encoder trains them")
        if self.head_lr is None:
            self.head_lr = DEFAULT_FROZEN_HEAD_LR if self.freeze_encoder else DEFAULT_HEAD_LR
        for name in ("encoder_lr", "head_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)!r}")
        ranges = {"warmup_ratio": (0.0, 1.0), "dropout": (0.0, 0.999)}
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"expected {name} in [{low}, {high}], got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"expected {name} >= 0, got {getattr(self, name)!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"expected device 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return dataclasses.asdict(self)


def set_seed(seed: int) -> None:
    """Seed ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tag_tensor(tag_lists: Sequence[Sequence[str]], labels: Sequence[str]) -> torch.Tensor:
    """Map tags to label indices, padded with 0; returns long ``(batch, max_words)``."""
    index = {label: position for position, label in enumerate(labels)}
    max_words = max((len(tags) for tags in tag_lists), default=0)
    ids = torch.zeros((len(tag_lists), max_words), dtype=torch.long)
    for row, tags in enumerate(tag_lists):
        for column, tag in enumerate(tags):
            if tag not in index:
                raise ValueError(f"expected a tag in {list(labels)}, got {tag!r} in sentence {row}")
            ids[row, column] = index[tag]
    return ids


def linear_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Return the learning-rate factor per step: linear rise over the warmup, then linear decay to 0."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def build_optimizer(tagger: Tagger, config: TrainConfig, total_steps: int):
    """Create AdamW with separate encoder and head groups, and its linear warmup-decay scheduler.

    Weight decay applies to weight matrices only, not to biases, layer norms
    or CRF scores. The encoder group is left out when the encoder is frozen.
    """
    groups = []
    modules = [("head", tagger.emission, config.head_lr), ("head", tagger.crf, config.head_lr)]
    if tagger.fine_tune_encoder:
        modules.insert(0, ("encoder", tagger.encoder, config.encoder_lr))
    for name, module, lr in modules:
        parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
        decays = module is not tagger.crf
        decayed = [parameter for parameter in parameters if decays and parameter.dim() >= 2]
        plain = [parameter for parameter in parameters if not (decays and parameter.dim() >= 2)]
        groups.append({"name": name, "params": decayed, "lr": lr, "weight_decay": config.weight_decay})
        groups.append({"name": name, "params": plain, "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, config.warmup_ratio))
    return optimizer, scheduler


def shuffled_batches(sizes: Sequence[int], batch_size: int, generator: random.Random, *, pool_batches: int = 50) -> Iterator[list[int]]:
    """Yield every index of ``sizes`` once, in random batches of sentences of similar length.

    The indices are shuffled, cut into pools of ``pool_batches`` batches, and
    each pool is sorted by sentence length before it is cut into batches; the
    batches are then shuffled. Padding to the longest sentence of a batch
    wastes far less encoder work than with fully random batches, while every
    epoch still sees a different order.
    """
    order = list(range(len(sizes)))
    generator.shuffle(order)
    pool_size = batch_size * pool_batches
    batches = []
    for first in range(0, len(order), pool_size):
        pool = sorted(order[first : first + pool_size], key=lambda index: sizes[index])
        batches.extend(pool[start : start + batch_size] for start in range(0, len(pool), batch_size))
    generator.shuffle(batches)
    yield from batches


def _optimisation_step(optimizer, scheduler, loss: torch.Tensor, max_grad_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()


def _snapshot(tagger: Tagger, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Copy the named tensors of ``tagger.state_dict()`` (all when ``names`` is None)."""
    state = tagger.state_dict()
    selected = state if names is None else {name: state[name] for name in names}
    return {name: tensor.detach().clone() for name, tensor in selected.items()}


def _train_epochs(
    tagger: Tagger,
    train: SentencePairs,
    dev: SentencePairs,
    *,
    batch_loss: Callable[[list[int]], torch.Tensor],
    predict_dev: Callable[[], list[list[str]]],
    epochs: int,
    config: TrainConfig,
    snapshot_names: Sequence[str] | None,
    progress: bool,
) -> list[dict[str, float]]:
    """Run the epochs, evaluate on dev after each one, and restore the epoch with the best dev F1.

    ``batch_loss(indices)`` returns the mean loss of those training
    sentences. Ties in dev F1 go to the later epoch.
    """
    sizes = [len(tokens) for tokens, _ in train]
    dev_gold = [tags for _, tags in dev]
    steps_per_epoch = -(-len(sizes) // config.batch_size)
    optimizer, scheduler = build_optimizer(tagger, config, epochs * steps_per_epoch)
    generator = random.Random(config.seed)
    history: list[dict[str, float]] = []
    best_f1, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        tagger.train()
        total_loss, words, started = 0.0, 0, time.perf_counter()
        with tqdm(total=sum(sizes), unit="word", desc=f"epoch {epoch}/{epochs}", disable=not progress) as bar:
            for batch in shuffled_batches(sizes, config.batch_size, generator):
                loss = batch_loss(batch)
                _optimisation_step(optimizer, scheduler, loss, config.max_grad_norm)
                batch_words = sum(sizes[index] for index in batch)
                total_loss += float(loss.detach()) * len(batch)
                words += batch_words
                bar.update(batch_words)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", words_per_s=f"{words / (time.perf_counter() - started):.0f}")
        elapsed = time.perf_counter() - started
        dev_f1 = evaluate(dev_gold, predict_dev())["micro"]["f1"]
        record = {"epoch": epoch, "loss": total_loss / max(1, len(sizes)), "dev_f1": dev_f1, "words_per_s": words / elapsed}
        history.append(record)
        logger.info("epoch %d/%d: loss %.4f, dev F1 %.4f, %.0f words/s", epoch, epochs, record["loss"], dev_f1, record["words_per_s"])
        if dev_f1 >= best_f1:
            best_f1, best_state = dev_f1, _snapshot(tagger, snapshot_names)
    tagger.load_state_dict(best_state, strict=snapshot_names is None)
    logger.info("kept the epoch with dev F1 %.4f", best_f1)
    return history


def fit_fine_tuned(
    tagger: Tagger,
    train: SentencePairs,
    dev: SentencePairs,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train encoder and head together on ``(tokens, tags)`` pairs; returns one record per epoch."""
    dev_tokens = [tokens for tokens, _ in dev]

    def batch_loss(batch: list[int]) -> torch.Tensor:
        tokens = [train[index][0] for index in batch]
        features, mask = tagger.forward_features(tokens)
        tag_ids = tag_tensor([train[index][1] for index in batch], tagger.labels)
        return tagger.loss_from_features(features, tag_ids, mask)

    def predict_dev() -> list[list[str]]:
        return tagger.predict(dev_tokens, batch_size=config.batch_size)

    return _train_epochs(
        tagger, train, dev, batch_loss=batch_loss, predict_dev=predict_dev, epochs=config.epochs,
        config=config, snapshot_names=None, progress=progress,
    )


def fit_frozen(
    tagger: Tagger,
    train: SentencePairs,
    dev: SentencePairs,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Compute word features once, then train only the head on them for ``config.head_epochs``."""
    if tagger.fine_tune_encoder:
        raise ValueError("expected a tagger with a frozen encoder, got fine_tune_encoder=True")
    tagger.enable_feature_cache()
    train_features = tagger.word_features([tokens for tokens, _ in train], batch_size=config.batch_size, progress=progress)
    dev_features = tagger.word_features([tokens for tokens, _ in dev], batch_size=config.batch_size, progress=progress)

    def batch_loss(batch: list[int]) -> torch.Tensor:
        features, mask = pad_features([train_features[index] for index in batch])
        tag_ids = tag_tensor([train[index][1] for index in batch], tagger.labels)
        return tagger.loss_from_features(features, tag_ids, mask)

    def predict_dev() -> list[list[str]]:
        tagger.eval()
        predictions: list[list[str]] = []
        with torch.no_grad():
            for start in range(0, len(dev_features), 256):
                features, mask = pad_features(dev_features[start : start + 256])
                predictions.extend(tagger.decode_features(features, mask))
        return predictions

    head_names = [name for name in tagger.state_dict() if name.startswith(("emission.", "crf."))]
    return _train_epochs(
        tagger, train, dev, batch_loss=batch_loss, predict_dev=predict_dev, epochs=config.head_epochs,
        config=config, snapshot_names=head_names, progress=progress,
    )


def train_tagger(
    train: SentencePairs,
    dev: SentencePairs,
    labels: Sequence[str],
    *,
    encoder: str | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[Tagger, list[dict[str, float]]]:
    """Build a tagger on ``encoder`` and train it on ``(tokens, tags)`` pairs with IOB2 tags.

    Sentences without words are skipped, and with ``config.max_train_sentences``
    only the first that many training sentences are used.

    Returns
    -------
    (tagger, history)
        The tagger in eval mode with the weights of the best dev epoch, and
        one record (epoch, loss, dev_f1, words_per_s) per epoch.
    """
    config = config or TrainConfig()
    set_seed(config.seed)
    train = [(list(tokens), list(tags)) for tokens, tags in train][: config.max_train_sentences]
    skipped = sum(1 for tokens, _ in train if not tokens)
    train = [pair for pair in train if pair[0]]
    if skipped:
        logger.info("skipped %d training sentences without words", skipped)
    if not train:
        raise ValueError("expected at least one training sentence with words, got none")
    tagger = Tagger.create(
        labels, encoder=encoder, dropout=config.dropout, fine_tune_encoder=not config.freeze_encoder,
        case_embeddings=False if config.freeze_encoder else config.case_embeddings, device=config.device,
    )
    logger.info(
        "training on %d sentences with %s, encoder %s, device %s",
        len(train), "a frozen encoder" if config.freeze_encoder else "fine-tuning", tagger.encoder_origin, tagger.device,
    )
    fit = fit_frozen if config.freeze_encoder else fit_fine_tuned
    history = fit(tagger, train, list(dev), config, progress=progress)
    tagger.eval()
    return tagger, history


PROJECT_FORMAT_VERSION = 1
SPLITS = ("train", "dev", "test")
# Outputs of an earlier run that a forced retraining replaces, so that no
# stale model or index survives next to the new project.json.
REPLACED_ENTRIES = ("project.json", "metrics.json", "data", "model", "index", FEATURES_FOLDER)


def _prepare_project_folder(out_dir: Path, *, overwrite: bool) -> None:
    """Create ``out_dir``, or clear the outputs of an earlier run when ``overwrite`` is set."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ProjectError(f"{out_dir}: exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ProjectError(f"{out_dir}: folder is not empty; choose another --out or pass --force to replace it")
        for name in REPLACED_ENTRIES:
            entry = out_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
        logger.info("replacing the project in %s", out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)


def _copy_input(split: str, source: Path, out_dir: Path) -> str:
    """Copy an input file byte for byte into ``out_dir/data``; returns its path relative to ``out_dir``."""
    relative = Path("data") / f"{split}{''.join(source.suffixes[-1:])}"
    if source.is_dir():
        shutil.copytree(source, out_dir / relative)
    else:
        shutil.copyfile(source, out_dir / relative)
    return relative.as_posix()


def _read_split(split: str, path: Path, options: dict[str, Any]):
    from segflu_core.conll import read_corpus

    corpus = read_corpus(path, **options)
    if corpus.scheme == "plain":
        raise TagSchemeError(
            f"{path}: the {split} file has labels without B-/I- prefixes, and the tagger needs a tag scheme; "
            "convert it with `segflu convert` to IOB2 first"
        )
    return corpus


def _evaluate_splits(tagger: Tagger, pairs: dict[str, list], *, batch_size: int) -> dict[str, dict[str, Any]]:
    """Evaluate the tagger on the dev and, where present, test ``(tokens, tags)`` pairs."""
    metrics = {}
    for split in ("dev", "test"):
        if split in pairs:
            gold = [tags for _, tags in pairs[split]]
            predicted = tagger.predict([tokens for tokens, _ in pairs[split]], batch_size=batch_size)
            metrics[split] = evaluate(gold, predicted)
    return metrics


def train_project(
    train: str | os.PathLike,
    dev: str | os.PathLike,
    test: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    encoder: str | None = None,
    config: TrainConfig | None = None,
    tag_column: int = -1,
    encoding: str = "utf-8",
    data_format: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a tagger and write the project folder ``out_dir``.

    The folder receives ``data/`` (byte-for-byte copies of the inputs, which
    are never modified), ``model/`` (:meth:`Tagger.save`), ``metrics.json``
    (dev and test evaluation) and, last, ``project.json``, so a folder without
    ``project.json`` is an unfinished run.

    Returns
    -------
    dict
        ``project`` (the content of ``project.json``), ``metrics`` and
        ``history`` (one record per epoch).

    Raises
    ------
    ProjectError
        When ``out_dir`` is not empty and ``overwrite`` is not set.
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    sources = {"train": train, "dev": dev, "test": test}
    sources = {split: Path(path).resolve() for split, path in sources.items() if path is not None}
    options = {"format": data_format, "tag_column": tag_column, "encoding": encoding}
    corpora = {split: _read_split(split, path, options) for split, path in sources.items()}
    _prepare_project_folder(out_dir, overwrite=overwrite)
    data = {}
    for split, path in sources.items():
        data[split] = {
            "path": _copy_input(split, path, out_dir),
            "source": str(path),
            "format": corpora[split].format,
            "tag_column": tag_column,
            "encoding": encoding,
            "scheme": corpora[split].scheme,
        }

    pairs = {split: [(s.tokens, s.tags) for s in corpus.sentences] for split, corpus in corpora.items()}
    labels = label_list(entity_types(tag for sentences in pairs.values() for _, tags in sentences for tag in tags))
    tagger, history = train_tagger(pairs["train"], pairs["dev"], labels, encoder=encoder, config=config, progress=progress)
    tagger.save(out_dir / "model")
    metrics = _evaluate_splits(tagger, pairs, batch_size=config.batch_size)
    write_json(out_dir / "metrics.json", metrics)
    if config.freeze_encoder:
        # The index builder reuses these instead of running the encoder again.
        save_features(out_dir, tagger, {split: [tokens for tokens, _ in pairs[split]] for split in pairs},
                      batch_size=config.batch_size)

    project = {
        "format_version": PROJECT_FORMAT_VERSION,
        "encoder": tagger.encoder_origin,
        "freeze_encoder": config.freeze_encoder,
        "labels": labels,
        "training": config.to_dict(),
        "data": data,
    }
    write_json(out_dir / "project.json", project)
    logger.info("wrote project %s (dev F1 %.4f)", out_dir, metrics["dev"]["micro"]["f1"])
    return {"project": project, "metrics": metrics, "history": history}
