"""Tag schemes: span round trips, conversions, problems, repairs and transition tables."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segflu_core.errors import TagSchemeError
from segflu_core.schemes import (
    SCHEMES,
    Span,
    allowed_transitions,
    convert_tags,
    detect_scheme,
    entity_types,
    find_tag_problems,
    label_list,
    relabel_span,
    repair_tags,
    spans_to_tags,
    tags_to_spans,
)

TYPES = ["LOC", "PER"]
SMALL = settings(max_examples=150, deadline=None)


@st.composite
def span_lists(draw, max_length: int = 12) -> tuple[list[Span], int]:
    """Draw sorted, non-overlapping spans (adjacent same-type spans included) and a sentence length."""
    length = draw(st.integers(min_value=0, max_value=max_length))
    spans = []
    position = 0
    while position < length:
        if draw(st.booleans()):
            position += 1
            continue
        width = draw(st.integers(min_value=1, max_value=min(3, length - position)))
        spans.append(Span(position, position + width, draw(st.sampled_from(TYPES))))
        position += width
    return spans, length


def all_sequences(labels: list[str], length: int):
    return itertools.product(labels, repeat=length)


def is_valid(tags: list[str], scheme: str) -> bool:
    return not find_tag_problems(tags, scheme)


def is_valid_by_table(tags: list[str], scheme: str) -> bool:
    """Check validity with allowed_transitions alone, independently of the scanner."""
    labels = label_list(TYPES, scheme)
    start, pairs, end = allowed_transitions(labels, scheme)
    if not tags:
        return True
    index = [labels.index(tag) for tag in tags]
    inner = all(pairs[a, b] for a, b in zip(index, index[1:]))
    return bool(start[index[0]] and end[index[-1]] and inner)


@pytest.mark.parametrize("scheme", SCHEMES)
@SMALL
@given(drawn=span_lists())
def test_spans_tags_round_trip(scheme, drawn):
    spans, length = drawn
    tags = spans_to_tags(spans, length, scheme)
    assert len(tags) == length
    assert tags_to_spans(tags, scheme) == spans
    assert is_valid(tags, scheme)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(SCHEMES, SCHEMES)))
@SMALL
@given(drawn=span_lists())
def test_convert_every_pair_and_back(source, target, drawn):
    spans, length = drawn
    tags = spans_to_tags(spans, length, source)
    converted = convert_tags(tags, source, target)
    assert tags_to_spans(converted, target) == spans
    assert convert_tags(converted, target, source) == tags


@pytest.mark.parametrize("scheme", SCHEMES)
def test_validity_matches_transition_table(scheme):
    labels = label_list(["PER", "LOC"], scheme)
    for length in range(4):
        for tags in all_sequences(labels, length):
            assert is_valid(list(tags), scheme) == is_valid_by_table(list(tags), scheme), tags


@pytest.mark.parametrize("scheme", SCHEMES)
def test_repair_is_valid_and_idempotent(scheme):
    labels = label_list(["PER", "LOC"], scheme)
    for tags in all_sequences(labels, 3):
        repaired = repair_tags(list(tags), scheme)
        assert is_valid(repaired, scheme), (tags, repaired)
        assert tags_to_spans(repaired, scheme) == tags_to_spans(list(tags), scheme)
        if is_valid(list(tags), scheme):
            assert repaired == list(tags)


@pytest.mark.parametrize(
    ("tags", "scheme", "spans"),
    [
        ([], "iob2", []),
        (["O", "O"], "iob2", []),
        (["I-PER", "I-PER"], "iob2", [Span(0, 2, "PER")]),
        (["B-PER", "I-LOC"], "iob2", [Span(0, 1, "PER"), Span(1, 2, "LOC")]),
        (["B-PER", "B-PER"], "iob2", [Span(0, 1, "PER"), Span(1, 2, "PER")]),
        (["I-PER", "B-PER", "I-PER"], "iob1", [Span(0, 1, "PER"), Span(1, 3, "PER")]),
        (["I-PER", "I-LOC"], "iob1", [Span(0, 1, "PER"), Span(1, 2, "LOC")]),
        (["S-PER", "S-PER"], "bioes", [Span(0, 1, "PER"), Span(1, 2, "PER")]),
        (["B-PER", "I-PER", "E-PER"], "bioes", [Span(0, 3, "PER")]),
        (["B-PER", "O"], "bioes", [Span(0, 1, "PER")]),
        (["E-PER", "E-PER"], "bioes", [Span(0, 1, "PER"), Span(1, 2, "PER")]),
    ],
)
def test_tags_to_spans_edge_cases(tags, scheme, spans):
    assert tags_to_spans(tags, scheme) == spans


@pytest.mark.parametrize(
    ("tags", "scheme", "positions", "repair"),
    [
        (["O", "I-PER"], "iob2", [1], ("O", "B-PER")),
        (["B-PER", "I-LOC"], "iob2", [1], ("B-PER", "B-LOC")),
        (["O", "B-PER"], "iob1", [1], ("O", "I-PER")),
        (["B-PER", "O"], "bioes", [1], ("S-PER", "O")),
        (["I-PER"], "bioes", [0, 0], ("S-PER",)),
        (["B-PER", "I-PER"], "bioes", [1], ("B-PER", "E-PER")),
    ],
)
def test_find_tag_problems_table(tags, scheme, positions, repair):
    problems = find_tag_problems(tags, scheme)
    assert [problem.position for problem in problems] == positions
    for problem in problems:
        assert problem.repair == repair
        assert problem.message


def test_unknown_prefix_lists_allowed():
    with pytest.raises(TagSchemeError, match=r"'X-PER'.*O, B-TYPE, I-TYPE"):
        tags_to_spans(["X-PER"], "iob2")
    with pytest.raises(TagSchemeError, match=r"'S-PER' for scheme iob2"):
        tags_to_spans(["S-PER"], "iob2")
    with pytest.raises(ValueError, match="expected a tag scheme"):
        tags_to_spans(["O"], "bilou")


def test_spans_to_tags_rejects_overlap():
    with pytest.raises(ValueError, match="non-overlapping"):
        spans_to_tags([Span(0, 2, "PER"), Span(1, 3, "LOC")], 4)
    with pytest.raises(ValueError, match="inside"):
        spans_to_tags([Span(2, 5, "PER")], 4)


@pytest.mark.parametrize(
    ("sequences", "scheme"),
    [
        ([["B-PER", "I-PER", "O"]], "iob2"),
        ([["I-PER", "O"], ["O", "I-LOC", "B-LOC"]], "iob1"),
        ([["B-PER", "E-PER"]], "bioes"),
        ([["S-PER"]], "bioes"),
        ([["O"]], "iob2"),
        ([["B-PER", "I-PER"], ["B-LOC"], ["O", "I-PER"]], "iob2"),
    ],
)
def test_detect_scheme(sequences, scheme):
    assert detect_scheme(sequences) == scheme


def test_label_list_and_entity_types():
    assert entity_types(["O", "B-PER", "I-LOC", "S-MISC", "B-PER"]) == ["LOC", "MISC", "PER"]
    assert label_list(["PER", "LOC"]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert label_list(["PER"], "bioes") == ["O", "B-PER", "I-PER", "E-PER", "S-PER"]


def test_allowed_transitions_iob2_examples():
    labels = label_list(["PER", "LOC"])
    start, pairs, end = allowed_transitions(labels)
    index = {label: i for i, label in enumerate(labels)}
    assert not start[index["I-PER"]]
    assert start[index["B-PER"]]
    assert pairs[index["B-PER"], index["I-PER"]]
    assert not pairs[index["B-PER"], index["I-LOC"]]
    assert not pairs[index["O"], index["I-LOC"]]
    assert end.all()


@pytest.mark.parametrize("scheme", SCHEMES)
@SMALL
@given(drawn=span_lists(), data=st.data())
def test_relabel_span_always_valid(scheme, drawn, data):
    spans, length = drawn
    if length == 0:
        return
    tags = spans_to_tags(spans, length, scheme)
    start = data.draw(st.integers(min_value=0, max_value=length - 1))
    end = data.draw(st.integers(min_value=start + 1, max_value=length))
    label = data.draw(st.sampled_from(TYPES + [None]))
    result = relabel_span(tags, start, end, label, scheme)
    assert is_valid(result, scheme)
    result_spans = tags_to_spans(result, scheme)
    if label is not None:
        assert Span(start, end, label) in result_spans
    for span in result_spans:
        if span.start >= end or span.end <= start:
            continue
        assert span == Span(start, end, label)
    # Tokens outside [start, end) keep their entity type.
    before = convert_tags(tags, scheme, "iob2")
    after = convert_tags(result, scheme, "iob2")
    for position in list(range(start)) + list(range(end, length)):
        assert before[position].partition("-")[2] == after[position].partition("-")[2]


def test_relabel_span_cuts_span_in_two():
    tags = ["I-PER", "I-PER", "I-PER", "O"]
    assert relabel_span(tags, 1, 2, None, "iob1") == ["I-PER", "O", "I-PER", "O"]
    assert relabel_span(tags, 1, 2, "PER", "iob1") == ["I-PER", "B-PER", "B-PER", "O"]
    assert relabel_span(["B-PER", "I-PER", "E-PER"], 2, 3, None, "bioes") == ["B-PER", "E-PER", "O"]
    with pytest.raises(ValueError, match="start < end"):
        relabel_span(tags, 2, 2, None)
