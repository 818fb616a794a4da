"""``f1``: CoNLL-2003 test F1 of the default encoder, with a frozen and a fine-tuned encoder.

The tagger trains on CoNLL++ ``conllpp_train.txt`` (the original CoNLL-2003
training labels in IOB2), picks its epoch on ``conllpp_dev.txt`` and is
tested on the original ``eng.testb``, whose IOB1 tags are read as IOB2.
Jain et al. (2022) report 92 test F1 with BigBird-base fine-tuned on a GPU.

The frozen tagger trains its head for 20 epochs. The fine-tuned one trains
for ``--fine-tune-epochs`` epochs (default 5) with batch 32 on every training
sentence, with case embeddings for the default encoder
(:func:`segflu_core.reproduce.common.fine_tune_config`).
"""

from __future__ import annotations

import json
import logging
import time

import pandas as pd

from segflu_core.reproduce.common import (
    RunSettings,
    data_file,
    fine_tune_config,
    head_config,
    train_and_index,
    write_result,
)
from segflu_core.reproduce.plots import bar_chart

logger = logging.getLogger(__name__)

NAME = "f1"
TRAIN_FILE = "conllpp/conllpp_train.txt"
DEV_FILE = "conllpp/conllpp_dev.txt"
TEST_FILE = "conll2003_original/eng.testb"
QUICK_SENTENCES = {"train": 60, "dev": 20, "test": 20}
FINE_TUNE_EPOCHS = 5


def read_splits(settings: RunSettings) -> dict:
    """Read the three files as sentences with IOB2 tags; quick mode keeps the first few sentences of each."""
    from segflu_core.conll import read_corpus

    files = {"train": TRAIN_FILE, "dev": DEV_FILE, "test": TEST_FILE}
    splits = {}
    for split, relative in files.items():
        sentences = [s for s in read_corpus(data_file(settings, relative)).sentences if s.tokens]
        splits[split] = sentences[: QUICK_SENTENCES[split]] if settings.quick else sentences
    return splits


def run(settings: RunSettings) -> dict:
    """Train a frozen-encoder and a fine-tuned tagger and write ``f1.json``; returns its content."""
    started = time.perf_counter()
    splits = read_splits(settings)
    figures, modes = {}, {}
    epochs = settings.fine_tune_epochs or FINE_TUNE_EPOCHS
    for mode, config in (("frozen", head_config(settings)), ("fine_tuned", fine_tune_config(settings, epochs))):
        mode_started = time.perf_counter()
        project = train_and_index(settings, f"{NAME}-{mode}", splits, config=config, index=False)
        metrics = json.loads((project.path / "metrics.json").read_text(encoding="utf-8"))
        figures[f"{mode}_test_f1"] = metrics["test"]["micro"]["f1"]
        figures[f"{mode}_dev_f1"] = metrics["dev"]["micro"]["f1"]
        modes[mode] = {**config.to_dict(), "wall_time_s": round(time.perf_counter() - mode_started, 2),
                       "test_per_type": metrics["test"]["per_type"]}
    table = per_type_table(modes)
    chart = bar_chart(table, x="type", y="f1", color="mode", title="CoNLL-2003 test F1 per entity type")
    parameters = {"sentences": {split: len(sentences) for split, sentences in splits.items()}, "modes": modes}
    return write_result(settings, NAME, figures, started=started, parameters=parameters,
                        tables={"per_type": table}, charts={"per_type": chart})


def per_type_table(modes: dict) -> pd.DataFrame:
    """Return one row per encoder mode and entity type with test precision, recall, F1 and support."""
    records = [
        {"mode": mode, "type": entity_type, **scores}
        for mode, details in modes.items() for entity_type, scores in details["test_per_type"].items()
    ]
    return pd.DataFrame.from_records(records, columns=["mode", "type", "precision", "recall", "f1", "support"])
