"""``dosage``: does influence surface inconsistent dosage labels in EBM-NLP interventions?

Protocol of Jain et al. (2022), section 6.3 and Tables 3 and 4. A tagger of
intervention spans trains on the crowd-labelled EBM-NLP abstracts and is
tested on the expert-labelled ones. Crowd workers sometimes put a dosage
(``20 mg``) inside the intervention span and sometimes not; the experts never
do. The queries are the test dosages that the tagger labels as intervention
although the expert left them out. For each query, the top supporting
training item of each method should exclude a dosage from an intervention
span, and the top opposing item should include one.

Data handling:

- ``dev.txt`` (crowd labels, cp1252) has token lines whose token is empty.
  They carry no text for the encoder, so they are dropped before reading
  and their number is reported as ``empty_tokens_dropped``.
- P/I/O/N labels become intervention spans: each run of ``I`` is one
  B-INT/I-INT span, and every other label is O.
- 10% of the crowd abstracts (seeded) are held out to pick the epoch, and
  the other 90% are the training set.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from segflu_core.conll import Sentence
from segflu_core.reproduce.common import (
    RunSettings,
    data_file,
    group_documents,
    train_and_index,
    training_summary,
    write_result,
)
from segflu_core.reproduce.plots import bar_chart

logger = logging.getLogger(__name__)

NAME = "dosage"
CROWD_FILE = "ebm_nlp/acl_lstm_crf_data/dev.txt"
EXPERT_FILE = "ebm_nlp/acl_lstm_crf_data/test.txt"
DEV_SHARE = 0.1
QUICK = {"train_abstracts": 20, "test_abstracts": 15}

_NUMBER = r"\d+(?:[.,]\d+)?"
_RANGE = rf"{_NUMBER}(?:\s*(?:-|–|to)\s*{_NUMBER})?"
_UNIT = (
    r"(?:mg|mcg|µg|μg|ug|ng|g|ml|mL|l|L|dl|dL|IU|iu|U|units?|mmol|µmol|μmol|meq|mEq|cc|"
    r"tablets?|capsules?|puffs?|drops?|sprays?)"
)
_PER = r"(?:\s*/\s*-?\s*(?:kg|m2|m²|day|d|h|hr|hour|min|dose|week|wk|L|l|dl|ml|mL|body\s+weight))*"
# An amount with a unit: "20 mg", "0.5 mg/kg", "2 x 100 mg", "10-20 mg/day", "1.5 g / m2".
# Percentages are left out, because most percentages in abstracts are results ("95 % CI"), and so
# is a bare "kg", because it mostly measures body weight ("27 kg/m2").
DOSAGE_PATTERN = re.compile(rf"(?<![\w.])(?:{_NUMBER}\s*[x×]\s*)?{_RANGE}\s*{_UNIT}{_PER}(?![\w/])")


def dosage_spans(tokens: list[str]) -> list[tuple[int, int]]:
    """Find dosages in a tokenised sentence; returns token spans ``[start, end)``.

    The tokens are joined by single spaces, matched with :data:`DOSAGE_PATTERN`,
    and each match becomes the span of the tokens it overlaps.
    """
    starts, position = [], 0
    for token in tokens:
        starts.append(position)
        position += len(token) + 1
    text = " ".join(tokens)
    spans = []
    for match in DOSAGE_PATTERN.finditer(text):
        first = int(np.searchsorted(starts, match.start(), side="right")) - 1
        last = int(np.searchsorted(starts, match.end() - 1, side="right")) - 1
        spans.append((first, last + 1))
    return spans


def intervention_tags(labels: list[str]) -> list[str]:
    """Turn P/I/O/N labels into IOB2 intervention tags: each run of ``I`` is one B-INT/I-INT span."""
    tags = []
    for position, label in enumerate(labels):
        if label != "I":
            tags.append("O")
        elif position > 0 and labels[position - 1] == "I":
            tags.append("I-INT")
        else:
            tags.append("B-INT")
    return tags


def drop_empty_tokens(source: Path, target: Path, encoding: str) -> int:
    """Copy a CoNLL file to ``target`` as UTF-8 without token lines whose token is empty; returns how many were dropped."""
    lines = source.read_bytes().decode(encoding).split("\n")
    kept = [line for line in lines if not (line.strip() and line.startswith(" "))]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(kept), encoding="utf-8")
    return len(lines) - len(kept)


def read_ebm(path: Path, work: Path, encoding: str) -> tuple[list[Sentence], int]:
    """Read an EBM-NLP file as sentences with intervention tags; returns them and the dropped empty tokens."""
    from segflu_core.conll import read_corpus

    cleaned = work / f"{path.stem}.utf8.txt"
    dropped = drop_empty_tokens(path, cleaned, encoding)
    corpus = read_corpus(cleaned, format="conll", scheme="plain", encoding="utf-8")
    sentences = [
        Sentence(list(s.tokens), intervention_tags(s.tags), s.doc, f"{path.stem}-{s.doc}") for s in corpus.sentences if s.tokens
    ]
    return sentences, dropped


def dosage_labels(sentence: Sentence) -> tuple[bool, bool]:
    """Return whether the sentence has a dosage outside every intervention span, and one inside a span."""
    excluded = included = False
    for start, end in dosage_spans(sentence.tokens):
        inside = [tag != "O" for tag in sentence.tags[start:end]]
        excluded |= not any(inside)
        included |= any(inside)
    return excluded, included


def is_dosage_word(sentence: Sentence, position: int) -> bool:
    """Return whether word ``position`` of the sentence lies in a dosage."""
    return any(start <= position < end for start, end in dosage_spans(sentence.tokens))


def mispredicted_dosages(sentences: list[Sentence], predicted: list[list[str]]) -> list[tuple[int, int, int]]:
    """Return the test dosages ``(sentence, start, end)`` that are O in gold but predicted as intervention."""
    queries = []
    for number, (sentence, tags) in enumerate(zip(sentences, predicted)):
        for start, end in dosage_spans(sentence.tokens):
            gold_outside = all(tag == "O" for tag in sentence.tags[start:end])
            if gold_outside and any(tag != "O" for tag in tags[start:end]):
                queries.append((number, start, end))
    return queries


def top_items(project, query: tuple[int, int, int], method: str) -> tuple[pd.Series | None, pd.Series | None]:
    """Return the top supporting and top opposing training rows of ``Project.explain`` for a test dosage.

    Nearest neighbours have no sides, so the nearest word with the dosage's
    own gold label type stands for the supporting item and the nearest word
    with another type for the opposing item.
    """
    sentence, start, end = query
    if method.startswith("nn-"):
        rows = [project.explain("test", sentence, start, end, method=method, label_filter=side, top_k=1)
                for side in ("same", "different")]
        return tuple(None if frame.empty else frame.iloc[0] for frame in rows)
    rows = project.explain("test", sentence, start, end, method=method, top_k=1)
    supporting = rows[rows["role"] == "supporting"].sort_values("score")
    opposing = rows[rows["role"] == "opposing"].sort_values("score", ascending=False)
    return (None if supporting.empty else supporting.iloc[0]), (None if opposing.empty else opposing.iloc[0])


def judge(train: list[Sentence], supporting, opposing, *, words: bool) -> dict[str, bool]:
    """Check the top items: the supporting one excludes a dosage from interventions, the opposing one includes one."""
    result = {}
    support_sentence = None if supporting is None else train[int(supporting["sentence"])]
    oppose_sentence = None if opposing is None else train[int(opposing["sentence"])]
    result["supporting_example"] = support_sentence is not None and dosage_labels(support_sentence)[0]
    result["opposing_example"] = oppose_sentence is not None and dosage_labels(oppose_sentence)[1]
    result["conflicting_example"] = result["supporting_example"] and result["opposing_example"]
    if words:
        result["supporting_word"] = support_sentence is not None and is_dosage_word(support_sentence, int(supporting["start"])) \
            and support_sentence.tags[int(supporting["start"])] == "O"
        result["opposing_word"] = oppose_sentence is not None and is_dosage_word(oppose_sentence, int(opposing["start"])) \
            and oppose_sentence.tags[int(opposing["start"])] != "O"
        result["conflicting_word"] = result["supporting_word"] and result["opposing_word"]
    return result


METHODS = {"instance": "instance", "segment": "segment", "nn_dot": "nn-dot", "nn_cosine": "nn-cosine"}
EXAMPLE_CHECKS = ("supporting_example", "opposing_example", "conflicting_example")
WORD_CHECKS = ("supporting_word", "opposing_word", "conflicting_word")


def share_table(table: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """Return, per method and check, the share of queries that pass; None when there is no query."""
    shares = {}
    for column, method in METHODS.items():
        checks = EXAMPLE_CHECKS if method == "instance" else EXAMPLE_CHECKS + WORD_CHECKS
        shares[column] = {check: float(table[f"{column}_{check}"].mean()) if len(table) else None for check in checks}
    return shares


def load_splits(settings: RunSettings, rng) -> tuple[dict, dict]:
    """Read the crowd and expert files, hold out crowd abstracts for epoch selection; returns splits and counts."""
    work = settings.out_dir / f"{NAME}-work" / "source"
    crowd, crowd_dropped = read_ebm(data_file(settings, CROWD_FILE), work, "cp1252")
    expert, expert_dropped = read_ebm(data_file(settings, EXPERT_FILE), work, "utf-8")
    abstracts = group_documents(crowd)
    test_abstracts = group_documents(expert)
    if settings.quick:
        abstracts = abstracts[: QUICK["train_abstracts"]]
        test_abstracts = test_abstracts[: QUICK["test_abstracts"]]
    held_out = set(int(i) for i in rng.choice(len(abstracts), size=max(1, round(DEV_SHARE * len(abstracts))), replace=False))
    splits = {
        "train": [crowd[i] for number, members in enumerate(abstracts) if number not in held_out for i in members],
        "dev": [crowd[i] for number in sorted(held_out) for i in abstracts[number]],
        "test": [expert[i] for members in test_abstracts for i in members],
    }
    counts = {
        "train_abstracts": len(abstracts) - len(held_out),
        "dev_abstracts": len(held_out),
        "test_abstracts": len(test_abstracts),
        "empty_tokens_dropped": crowd_dropped + expert_dropped,
    }
    return splits, counts


def run(settings: RunSettings) -> dict:
    """Run the experiment and write ``dosage.json``; returns its content."""
    started = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    splits, counts = load_splits(settings, rng)
    project = train_and_index(settings, NAME, splits)
    train = project.sentences("train")
    test = project.sentences("test")

    queries = mispredicted_dosages(test, project.predicted_tags("test"))
    queries_mispredicted = bool(queries)
    if not queries and settings.quick:
        # The quick model may predict no intervention at all; every gold-O dosage then keeps the pipeline covered.
        queries = mispredicted_dosages(test, [["B-INT"] * len(s.tokens) for s in test])

    records = []
    for query in queries:
        record = {"sentence": query[0], "start": query[1], "end": query[2], "text": " ".join(test[query[0]].tokens[query[1]:query[2]])}
        for column, method in METHODS.items():
            verdict = judge(train, *top_items(project, query, method), words=method != "instance")
            record.update({f"{column}_{key}": value for key, value in verdict.items()})
        records.append(record)
    table = pd.DataFrame.from_records(records)

    figures = {
        "test_dosages": sum(len(dosage_spans(s.tokens)) for s in test),
        "mispredicted_dosages": len(queries) if queries_mispredicted else 0,
        "queries": len(queries),
        "queries_mispredicted": queries_mispredicted,
        "shares": share_table(table),
    }
    bars = pd.DataFrame([
        {"method": column, "check": key, "share": value}
        for column, values in figures["shares"].items() for key, value in values.items() if value is not None
    ], columns=["method", "check", "share"])
    chart = bar_chart(bars, x="method", y="share", color="check", title="Top items show the dosage label conflict")
    parameters = {**counts, "dev_share": DEV_SHARE, **training_summary(project)}
    return write_result(settings, NAME, figures, started=started, parameters=parameters,
                        tables={"queries": table}, charts={"shares": chart})
