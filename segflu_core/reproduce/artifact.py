"""``artifact``: does influence find the training words that taught a synthetic artifact?

Protocol of Jain et al. (2022), section 5.2. The training file
``train_corrected_artifact.jsonl`` has the token ``special`` (tag O)
inserted before an O word in 12.6% of the sentences, and that word relabelled
B-PER. The same artifact is inserted into 10% of the validation sentences.
For each validation word after an artifact, the top supporting training item
of each method is checked. Segment influence and nearest neighbours return
words, which count when they follow an artifact. Instance influence returns
sentences, which count when they contain one.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from segflu_core.conll import Sentence
from segflu_core.reproduce.common import (
    PAPER_DATA,
    RunSettings,
    data_file,
    read_paper_jsonl,
    train_and_index,
    training_summary,
    write_result,
)
from segflu_core.reproduce.plots import bar_chart

logger = logging.getLogger(__name__)

NAME = "artifact"
ARTIFACT = "special"
ARTIFACT_TAG = "B-PER"
VALIDATION_SHARE = 0.1
# (column of the figures, explain method); word methods count a word after an artifact.
METHODS = {"segment": "segment", "instance": "instance", "nn_dot": "nn-dot", "nn_cosine": "nn-cosine"}
QUICK = {"train_artifact_sentences": 40, "train_plain_sentences": 40, "validation_sentences": 40}


def insert_artifact(tokens: list[str], tags: list[str], rng: np.random.Generator) -> tuple[list[str], list[str], int] | None:
    """Insert ``special`` (tag O) before a random O word at position 1 or later and relabel that word B-PER.

    Returns
    -------
    (tokens, tags, position) or None
        New lists and the position of the relabelled word in them, or None
        when the sentence has no O word after its first word.
    """
    candidates = [position for position in range(1, len(tokens)) if tags[position] == "O"]
    if not candidates:
        return None
    position = int(rng.choice(candidates))
    new_tokens = tokens[:position] + [ARTIFACT] + tokens[position:]
    new_tags = tags[:position] + ["O", ARTIFACT_TAG] + tags[position + 1 :]
    return new_tokens, new_tags, position + 1


def artifact_validation(sentences: list[Sentence], share: float, rng: np.random.Generator) -> tuple[list[Sentence], dict[int, int]]:
    """Insert the artifact into ``share`` of the sentences (drawn among those that can take it).

    Returns the new sentence list and, per modified sentence index, the position of the relabelled word.
    """
    eligible = [i for i, s in enumerate(sentences) if any(tag == "O" for tag in s.tags[1:])]
    count = min(len(eligible), max(1, round(share * len(sentences))))
    chosen = set(int(i) for i in rng.choice(eligible, size=count, replace=False))
    result, queries = [], {}
    for index, sentence in enumerate(sentences):
        if index in chosen:
            tokens, tags, position = insert_artifact(sentence.tokens, sentence.tags, rng)
            queries[index] = position
            sentence = Sentence(tokens, tags, sentence.doc, sentence.doc_id, sentence.id)
        result.append(sentence)
    return result, queries


def follows_artifact(train_sentences: list[Sentence], sentence: int, start: int) -> bool:
    """Return whether word ``start`` of a training sentence comes right after the artifact token."""
    return start >= 1 and train_sentences[sentence].tokens[start - 1] == ARTIFACT


def top_hit(project, train_sentences, sentence: int, position: int, method: str) -> bool:
    """Return whether the top supporting item (top neighbour for nearest neighbours) shows the artifact."""
    rows = project.explain("dev", sentence, position, position + 1, labels="gold", method=method, top_k=1)
    rows = rows[rows["role"] != "opposing"]
    if rows.empty:
        return False
    top = rows.iloc[0] if method.startswith("nn-") else rows.sort_values("score").iloc[0]
    if method == "instance":
        return ARTIFACT in train_sentences[int(top["sentence"])].tokens
    return follows_artifact(train_sentences, int(top["sentence"]), int(top["start"]))


def training_slice(settings: RunSettings, sentences: list[Sentence], metadata: list[dict], rng) -> list[Sentence]:
    """Return every training sentence, or in quick mode a sample with artifact and plain sentences."""
    if not settings.quick:
        return sentences
    modified = [i for i, meta in enumerate(metadata) if meta.get("modified")]
    plain = [i for i, meta in enumerate(metadata) if not meta.get("modified")]
    chosen = np.concatenate([
        rng.choice(modified, size=QUICK["train_artifact_sentences"], replace=False),
        rng.choice(plain, size=QUICK["train_plain_sentences"], replace=False),
    ])
    return [sentences[i] for i in np.sort(chosen)]


def run(settings: RunSettings) -> dict:
    """Run the experiment and write ``artifact.json``; returns its content."""
    started = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    train, metadata = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/train_corrected_artifact.jsonl"))
    validation, _ = read_paper_jsonl(data_file(settings, f"{PAPER_DATA}/validation_corrected.jsonl"))
    train = training_slice(settings, train, metadata, rng)
    if settings.quick:
        validation = validation[: QUICK["validation_sentences"]]
    validation, queries = artifact_validation(validation, VALIDATION_SHARE, rng)
    project = train_and_index(settings, NAME, {"train": train, "dev": validation})
    train_sentences = project.sentences("train")
    predictions = project.predicted_tags("dev")

    records = []
    for sentence, position in queries.items():
        record = {"sentence": sentence, "position": position, "word": validation[sentence].tokens[position],
                  "predicted": predictions[sentence][position]}
        for column, method in METHODS.items():
            record[column] = top_hit(project, train_sentences, sentence, position, method)
        records.append(record)
    table = pd.DataFrame.from_records(records)
    figures = {
        "queries": len(table),
        "predicted_b_per_share": float((table["predicted"] == ARTIFACT_TAG).mean()),
        **{f"{column}_top1_share": float(table[column].mean()) for column in METHODS},
    }
    shares = pd.DataFrame({"method": list(METHODS), "share": [figures[f"{c}_top1_share"] for c in METHODS]})
    chart = bar_chart(shares, x="method", y="share", title="Top supporting item shows the artifact")
    parameters = {
        "train_sentences": len(train),
        "validation_sentences": len(validation),
        "validation_share": VALIDATION_SHARE,
        **training_summary(project),
    }
    return write_result(settings, NAME, figures, started=started, parameters=parameters,
                        tables={"queries": table}, charts={"shares": chart})
