"""Tag schemes IOB1, IOB2 and BIOES, and conversion between tags and spans.

Spans are half-open token offsets ``[start, end)``. Each scheme is data: a
table of allowed prefixes, the (previous prefix, current prefix) pairs that
continue an open span of the same type, and the (previous prefix, current
prefix, same type?) triples that are valid. One scanner reads every scheme
with these tables. Sentence boundaries count as an ``O`` tag on either side.

The scanner is lenient: a tag that cannot continue the open span starts a new
one, so every sequence has one reading as spans. A sequence is valid when every
adjacent pair is in the scheme's table of valid triples, and the repair of an
invalid sequence is its reading written back in the same scheme.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from segflu_core.errors import TagSchemeError

SCHEMES = ("iob1", "iob2", "bioes")

OUTSIDE = "O"
SAME = "same"
OTHER = "other"
ANY = "any"


@dataclass(frozen=True)
class Span:
    """Entity span over tokens ``[start, end)`` with entity type ``label`` (e.g. ``"PER"``)."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class TagProblem:
    """Invalid tag transition at token ``position`` and the whole repaired tag sequence."""

    position: int
    message: str
    repair: tuple[str, ...]


@dataclass(frozen=True)
class SchemeTable:
    """Prefixes of a tag scheme and its transition rules.

    ``continues`` contains the (previous prefix, current prefix) pairs that extend
    an open span when both tags have the same type. ``valid`` contains the
    (previous prefix, current prefix, same type?) triples allowed between
    adjacent tokens, with ``"O"`` standing for an outside tag or a sentence
    boundary. ``begin_prefix``, ``inside_prefix``, ``end_prefix`` and
    ``single_prefix`` say how :func:`spans_to_tags` writes a span.
    """

    name: str
    prefixes: tuple[str, ...]
    continues: frozenset[tuple[str, str]]
    valid: frozenset[tuple[str, str, bool]]
    begin_prefix: str
    inside_prefix: str
    end_prefix: str
    single_prefix: str
    # IOB1 writes the first token of a span with the inside prefix unless the
    # span directly follows a span of the same type.
    begin_only_after_same: bool = False


def _triples(rules: Iterable[tuple[str, str, str]]) -> frozenset[tuple[str, str, bool]]:
    """Expand rules whose third item is ``same``, ``other`` or ``any`` into (prev, cur, same) triples."""
    triples = set()
    for previous, current, kind in rules:
        if OUTSIDE in (previous, current):
            # An outside tag has no type, so only the "different type" case exists.
            triples.add((previous, current, False))
            continue
        if kind in (SAME, ANY):
            triples.add((previous, current, True))
        if kind in (OTHER, ANY):
            triples.add((previous, current, False))
    return frozenset(triples)


_IOB2 = SchemeTable(
    name="iob2",
    prefixes=("B", "I"),
    continues=frozenset({("B", "I"), ("I", "I")}),
    valid=_triples([
        ("O", "O", ANY), ("B", "O", ANY), ("I", "O", ANY),
        ("O", "B", ANY), ("B", "B", ANY), ("I", "B", ANY),
        ("B", "I", SAME), ("I", "I", SAME),
    ]),
    begin_prefix="B", inside_prefix="I", end_prefix="I", single_prefix="B",
)

_IOB1 = SchemeTable(
    name="iob1",
    prefixes=("B", "I"),
    continues=frozenset({("B", "I"), ("I", "I")}),
    valid=_triples([
        ("O", "O", ANY), ("B", "O", ANY), ("I", "O", ANY),
        ("O", "I", ANY), ("B", "I", ANY), ("I", "I", ANY),
        ("B", "B", SAME), ("I", "B", SAME),
    ]),
    begin_prefix="I", inside_prefix="I", end_prefix="I", single_prefix="I",
    begin_only_after_same=True,
)

_BIOES = SchemeTable(
    name="bioes",
    prefixes=("B", "I", "E", "S"),
    continues=frozenset({("B", "I"), ("I", "I"), ("B", "E"), ("I", "E")}),
    valid=_triples([
        ("O", "O", ANY), ("E", "O", ANY), ("S", "O", ANY),
        ("O", "B", ANY), ("E", "B", ANY), ("S", "B", ANY),
        ("O", "S", ANY), ("E", "S", ANY), ("S", "S", ANY),
        ("B", "I", SAME), ("I", "I", SAME), ("B", "E", SAME), ("I", "E", SAME),
    ]),
    begin_prefix="B", inside_prefix="I", end_prefix="E", single_prefix="S",
)

TABLES: dict[str, SchemeTable] = {"iob1": _IOB1, "iob2": _IOB2, "bioes": _BIOES}


def scheme_table(scheme: str) -> SchemeTable:
    """Return the table of ``scheme``, raising ``ValueError`` for an unknown name."""
    try:
        return TABLES[scheme]
    except KeyError:
        raise ValueError(f"expected a tag scheme in {', '.join(SCHEMES)}, got {scheme!r}") from None


@lru_cache(maxsize=4096)
def split_tag(tag: str, scheme: str = "iob2") -> tuple[str, str | None]:
    """Split ``"B-PER"`` into ``("B", "PER")`` and ``"O"`` into ``("O", None)``.

    Raises
    ------
    TagSchemeError
        When the prefix is not one of the scheme's prefixes or the type is empty.
    """
    if tag == OUTSIDE:
        return OUTSIDE, None
    table = scheme_table(scheme)
    prefix, dash, label = tag.partition("-")
    if not dash or prefix not in table.prefixes or not label:
        allowed = ", ".join([OUTSIDE] + [f"{p}-TYPE" for p in table.prefixes])
        raise TagSchemeError(f"unknown tag {tag!r} for scheme {scheme}: allowed tags are {allowed}")
    return prefix, label


def _describe(tag: str) -> str:
    return "the sentence boundary" if tag == "" else repr(tag)


def _scan(tags: Sequence[str], table: SchemeTable) -> tuple[list[Span], list[tuple[int, str]]]:
    """Read ``tags`` as spans and list the invalid transitions as (position, message)."""
    spans: list[Span] = []
    invalid: list[tuple[int, str]] = []
    previous_prefix, previous_label, previous_tag = OUTSIDE, None, ""
    open_start: int | None = None
    for position in range(len(tags) + 1):
        tag = tags[position] if position < len(tags) else ""
        prefix, label = split_tag(tag, table.name) if tag else (OUTSIDE, None)
        same = label is not None and label == previous_label
        if (previous_prefix, prefix, same) not in table.valid:
            where = position if position < len(tags) else position - 1
            invalid.append((where, f"{_describe(tag)} cannot follow {_describe(previous_tag)} in {table.name.upper()}"))
        if not (same and (previous_prefix, prefix) in table.continues):
            if open_start is not None:
                spans.append(Span(open_start, position, previous_label))
            open_start = position if label is not None else None
        previous_prefix, previous_label, previous_tag = prefix, label, tag
    return spans, invalid


def tags_to_spans(tags: Sequence[str], scheme: str = "iob2") -> list[Span]:
    """Read a tag sequence as entity spans, sorted by start.

    Invalid sequences are read leniently: a tag that cannot continue the open
    span starts a new span of its own type.
    """
    return _scan(tags, scheme_table(scheme))[0]


def _check_spans(spans: list[Span], length: int) -> None:
    previous_end = 0
    for span in spans:
        if not (previous_end <= span.start < span.end <= length):
            raise ValueError(
                f"expected sorted, non-overlapping, non-empty spans inside [0, {length}), got {span} "
                f"after a span ending at {previous_end}"
            )
        if not span.label or span.label == OUTSIDE:
            raise ValueError(f"expected an entity type as span label, got {span.label!r}")
        previous_end = span.end


def spans_to_tags(spans: Iterable[Span], length: int, scheme: str = "iob2") -> list[str]:
    """Write entity spans as a tag sequence of ``length`` tokens in ``scheme``.

    Raises
    ------
    ValueError
        When spans overlap, are empty or fall outside ``[0, length)``.
    """
    table = scheme_table(scheme)
    ordered = sorted(spans, key=lambda span: span.start)
    _check_spans(ordered, length)
    tags = [OUTSIDE] * length
    previous: Span | None = None
    for span in ordered:
        follows_same = previous is not None and previous.end == span.start and previous.label == span.label
        if span.end - span.start == 1:
            first = table.single_prefix
        else:
            first = table.begin_prefix
            tags[span.end - 1] = f"{table.end_prefix}-{span.label}"
            for position in range(span.start + 1, span.end - 1):
                tags[position] = f"{table.inside_prefix}-{span.label}"
        if table.begin_only_after_same and follows_same:
            first = "B"
        tags[span.start] = f"{first}-{span.label}"
        previous = span
    return tags


def convert_tags(tags: Sequence[str], source: str, target: str) -> list[str]:
    """Convert a tag sequence from scheme ``source`` to scheme ``target`` through its spans."""
    scheme_table(target)
    return spans_to_tags(tags_to_spans(tags, source), len(tags), target)


def detect_scheme(tag_sequences: Iterable[Sequence[str]]) -> str:
    """Guess the scheme of tag sequences.

    Returns ``"bioes"`` when any ``S-`` or ``E-`` tag occurs. Otherwise returns
    ``"iob1"`` when ``I-`` tags start spans (after ``O``, a sentence boundary or
    another type) more often than ``B-`` tags start spans that do not follow
    the same type, and ``"iob2"`` else. Counting both keeps an IOB2 file
    with a few stray ``I-`` tags from being read as IOB1.
    """
    inside_starts = 0
    unneeded_begins = 0
    for tags in tag_sequences:
        previous_label = None
        for tag in tags:
            prefix, _, label = tag.partition("-")
            if prefix in ("S", "E") and label:
                return "bioes"
            if tag == OUTSIDE or not label:
                previous_label = None
                continue
            if label != previous_label:
                inside_starts += prefix == "I"
                unneeded_begins += prefix == "B"
            previous_label = label
    return "iob1" if inside_starts > unneeded_begins else "iob2"


def find_tag_problems(tags: Sequence[str], scheme: str) -> list[TagProblem]:
    """List the invalid transitions of a tag sequence, each with the repaired sequence.

    Raises
    ------
    TagSchemeError
        When a tag has a prefix the scheme does not allow.
    """
    table = scheme_table(scheme)
    spans, invalid = _scan(tags, table)
    if not invalid:
        return []
    repaired = tuple(spans_to_tags(spans, len(tags), scheme))
    return [TagProblem(position, message, repaired) for position, message in invalid]


def repair_tags(tags: Sequence[str], scheme: str) -> list[str]:
    """Return the valid sequence in ``scheme`` with the same lenient reading as ``tags``."""
    return convert_tags(tags, scheme, scheme)


def entity_types(labels: Iterable[str]) -> list[str]:
    """Return the sorted entity types of tags or labels, without prefixes and without ``O``."""
    types = set()
    for label in labels:
        if label == OUTSIDE:
            continue
        prefix, dash, kind = label.partition("-")
        types.add(kind if dash and prefix in ("B", "I", "E", "S") else label)
    return sorted(types)


def label_list(types: Iterable[str], scheme: str = "iob2") -> list[str]:
    """Return ``"O"`` and then, per sorted type, its tags in ``scheme`` (``B-X``, ``I-X``, ``E-X``, ``S-X``)."""
    table = scheme_table(scheme)
    labels = [OUTSIDE]
    for kind in sorted(set(types)):
        labels.extend(f"{prefix}-{kind}" for prefix in table.prefixes)
    return labels


def allowed_transitions(labels: Sequence[str], scheme: str = "iob2") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tabulate which tags may start, follow each other and end a sentence.

    Parameters
    ----------
    labels : sequence of str
        The ``C`` tags, e.g. from :func:`label_list`.

    Returns
    -------
    start : numpy.ndarray
        bool, shape ``(C,)``: tag allowed as the first tag of a sentence.
    pairs : numpy.ndarray
        bool, shape ``(C, C)``: ``pairs[previous, next]`` is an allowed transition.
    end : numpy.ndarray
        bool, shape ``(C,)``: tag allowed as the last tag of a sentence.
    """
    table = scheme_table(scheme)
    parsed = [split_tag(label, scheme) for label in labels]
    start = np.array([(OUTSIDE, prefix, False) in table.valid for prefix, _ in parsed], dtype=bool)
    end = np.array([(prefix, OUTSIDE, False) in table.valid for prefix, _ in parsed], dtype=bool)
    # shape: (C, C)
    pairs = np.zeros((len(labels), len(labels)), dtype=bool)
    for i, (previous_prefix, previous_label) in enumerate(parsed):
        for j, (prefix, label) in enumerate(parsed):
            same = label is not None and label == previous_label
            pairs[i, j] = (previous_prefix, prefix, same) in table.valid
    return start, pairs, end


def relabel_span(
    tags: Sequence[str], start: int, end: int, label: str | None, scheme: str = "iob2"
) -> list[str]:
    """Make tokens ``[start, end)`` one entity of type ``label`` (``None``: outside) and keep the sequence valid.

    Spans that overlap ``[start, end)`` keep their parts outside it, so a span
    cut in two becomes two spans. The whole sequence is written back from its
    spans, so neighbouring tags get the prefixes the scheme needs, and any
    invalid transition elsewhere in ``tags`` is repaired as well.
    """
    if not 0 <= start < end <= len(tags):
        raise ValueError(f"expected 0 <= start < end <= {len(tags)}, got start={start}, end={end}")
    if label is not None and (not label or label == OUTSIDE):
        raise ValueError(f"expected an entity type or None as label, got {label!r}")
    spans = []
    for span in tags_to_spans(tags, scheme):
        if span.end <= start or span.start >= end:
            spans.append(span)
            continue
        if span.start < start:
            spans.append(Span(span.start, start, span.label))
        if span.end > end:
            spans.append(Span(end, span.end, span.label))
    if label is not None:
        spans.append(Span(start, end, label))
    return spans_to_tags(spans, len(tags), scheme)
