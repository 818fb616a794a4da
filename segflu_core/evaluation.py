"""Entity-level evaluation of predicted IOB2 tags.

Precision, recall and F1 come from seqeval in strict IOB2 mode, where an
entity counts only when its boundaries and type match exactly. The confusion
counts pair gold and predicted spans with identical boundaries.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from segflu_core.schemes import tags_to_spans

MISSED = "missed"
SPURIOUS = "spurious"


def _check_pairs(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(predicted):
        raise ValueError(f"expected as many predicted sentences as gold sentences ({len(gold)}), got {len(predicted)}")
    for index, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(
                f"expected {len(gold_tags)} predicted tags in sentence {index}, got {len(predicted_tags)}"
            )


def span_confusion(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, dict[str, int]]:
    """Count predicted entity types against gold entity types.

    A gold span and a predicted span with the same ``[start, end)`` form a
    pair, counted under ``counts[gold_type][predicted_type]``. A gold span
    without such a predicted span counts as ``counts[gold_type]["missed"]``,
    and a predicted span without a gold one as
    ``counts["spurious"][predicted_type]``.
    """
    _check_pairs(gold, predicted)
    counts: dict[str, Counter] = {}
    for gold_tags, predicted_tags in zip(gold, predicted):
        gold_spans = {(span.start, span.end): span.label for span in tags_to_spans(list(gold_tags), "iob2")}
        predicted_spans = {(span.start, span.end): span.label for span in tags_to_spans(list(predicted_tags), "iob2")}
        for boundaries, gold_type in gold_spans.items():
            predicted_type = predicted_spans.get(boundaries, MISSED)
            counts.setdefault(gold_type, Counter())[predicted_type] += 1
        for boundaries, predicted_type in predicted_spans.items():
            if boundaries not in gold_spans:
                counts.setdefault(SPURIOUS, Counter())[predicted_type] += 1
    return {gold_type: dict(sorted(row.items())) for gold_type, row in sorted(counts.items())}


def evaluate(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Score predicted IOB2 tags against gold tags at the entity level.

    Parameters
    ----------
    gold, predicted : sequence of sequence of str
        One IOB2 tag per word, with the same sentence and word counts.

    Returns
    -------
    dict
        ``"per_type"``: for each entity type, ``precision``, ``recall``,
        ``f1`` and ``support`` (gold entities); ``"micro"`` and ``"macro"``:
        the same averaged over types; ``"confusion"``: see
        :func:`span_confusion`.
    """
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    _check_pairs(gold, predicted)
    gold_lists = [list(tags) for tags in gold]
    predicted_lists = [list(tags) for tags in predicted]
    confusion = span_confusion(gold_lists, predicted_lists)
    empty = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    if not confusion:
        # No entity on either side: seqeval's macro average would be NaN.
        return {"per_type": {}, "micro": dict(empty), "macro": dict(empty), "confusion": {}}
    report = classification_report(
        gold_lists, predicted_lists, mode="strict", scheme=IOB2, output_dict=True, zero_division=0
    )
    keys = ("precision", "recall", "f1-score", "support")

    def scores(row: dict[str, Any]) -> dict[str, float | int]:
        values = {name.replace("-score", ""): row[name] for name in keys}
        values["support"] = int(values["support"])
        return {name: (value if name == "support" else float(value)) for name, value in values.items()}

    averages = {"micro avg": "micro", "macro avg": "macro"}
    result: dict[str, Any] = {"per_type": {}, "micro": None, "macro": None}
    for name, row in report.items():
        if name in averages:
            result[averages[name]] = scores(row)
        elif name != "weighted avg":
            result["per_type"][name] = scores(row)
    result["micro"] = result["micro"] or dict(empty)
    result["macro"] = result["macro"] or dict(empty)
    result["confusion"] = confusion
    return result
