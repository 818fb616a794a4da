"""Tests of the HTML helpers: dataset strings render as text, spans as marks."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from segflu_core import render

ALLOWED_TAGS = {"div", "span", "mark", "sub", "table", "tr", "th", "td"}
HOSTILE_TOKENS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(1)>',
    "a&b",
    "*bold* _x_ `code`",
    "line\n\nbreak",
]


class TagCollector(HTMLParser):
    """Collect every start tag with its attributes, every text run and the text inside marks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.marks: list[str] = []
        self._mark_depth = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "mark":
            self._mark_depth += 1
            self.marks.append("")

    def handle_endtag(self, tag):
        if tag == "mark":
            self._mark_depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._mark_depth:
            self.marks[-1] += data


def parse(markup: str) -> TagCollector:
    collector = TagCollector()
    collector.feed(markup)
    collector.close()
    return collector


def test_hostile_tokens_render_as_text():
    markup = render.tokens_html(HOSTILE_TOKENS, [(0, 2, "<b>PER</b>")])
    parsed = parse(markup)

    tag_names = {name for name, _attrs in parsed.tags}
    assert tag_names <= ALLOWED_TAGS
    for _name, attrs in parsed.tags:
        assert not any(key.startswith("on") for key in attrs)
    text = "".join(parsed.text)
    for token in HOSTILE_TOKENS:
        assert token in text
    assert "<b>PER</b>" in text


def test_snippets_stay_on_one_line():
    snippets = [
        render.tokens_html(HOSTILE_TOKENS),
        render.sentence_html(HOSTILE_TOKENS, [], [(5, 6, "X\n\nY")]),
        render.item_html(HOSTILE_TOKENS, [], start=0, end=1, score=1.0, title="train\n\n#3", conflict=True),
        render.tag_change_html(HOSTILE_TOKENS, ["O"] * 6, ["B-PER"] + ["O"] * 5),
    ]
    for snippet in snippets:
        assert "\n" not in snippet
        assert "\r" not in snippet
        assert snippet.startswith("<div") or snippet.startswith("<span")


def test_marks_hold_span_tokens_and_label():
    tokens = ["John", "Smith", "went", "to", "New", "York", "."]
    spans = [(4, 6, "LOC"), (0, 2, "PER")]

    parsed = parse(render.tokens_html(tokens, spans))

    assert parsed.marks == ["John Smith PER", "New York LOC"]


def test_outside_tokens_are_plain_text():
    tokens = ["a", "b", "c"]
    parsed = parse(render.tokens_html(tokens, []))

    assert parsed.marks == []
    assert "".join(parsed.text).split() == tokens


def test_focus_outlines_the_focused_tokens():
    tokens = ["w0", "w1", "w2", "w3"]
    markup = render.tokens_html(tokens, [], focus=(1, 3))

    assert markup.count("segflu-focus") == 2
    before_focus, _, _ = markup.partition("segflu-focus")
    assert "w0" in before_focus
    assert "w1" not in before_focus


def test_span_objects_are_accepted():
    class Span:
        def __init__(self, start, end, label):
            self.start, self.end, self.label = start, end, label

    assert render.as_span_tuples([Span(2, 3, "ORG"), Span(0, 1, "PER")]) == [(0, 1, "PER"), (2, 3, "ORG")]


def test_conflict_badge_only_for_conflicts():
    with_conflict = render.item_html(["x"], [], start=0, end=1, score=0.5, title="t", conflict=True)
    without_conflict = render.item_html(["x"], [], start=0, end=1, score=0.5, title="t", conflict=False)

    assert "segflu-conflict" in with_conflict
    assert "segflu-conflict" not in without_conflict


def test_tag_change_marks_changed_cells():
    markup = render.tag_change_html(["a", "b", "c"], ["B-PER", "I-PER", "O"], ["B-LOC", "I-PER", "O"])
    parsed = parse(markup)

    cells = [attrs for name, attrs in parsed.tags if name == "td"]
    highlighted = [attrs for attrs in cells if attrs.get("style")]
    assert len(cells) == 9
    assert len(highlighted) == 1


def test_tag_change_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equal length"):
        render.tag_change_html(["a"], ["O", "O"], ["O"])


def test_label_color_is_stable():
    assert render.label_color("PER") == render.label_color("PER")
    assert render.label_color("PER") in render.PALETTE


def test_sentence_rows_follow_given_layers():
    tokens = ["Ann", "went", "home"]

    both = render.sentence_html(tokens, [(0, 1, "PER")], [(2, 3, "LOC")])
    predicted_only = render.sentence_html(tokens, None, [(2, 3, "LOC")])

    assert parse(both).marks == ["Ann PER", "home LOC"]
    assert ">gold<" in both
    assert ">predicted<" in both
    assert ">gold<" not in predicted_only
    assert parse(predicted_only).marks == ["home LOC"]


def test_focus_inside_entity_outlines_only_focused_words():
    tokens = ["Hunico", "/", "match"]
    markup = render.tokens_html(tokens, [(0, 2, "PER")], focus=(1, 2))

    assert markup.count("segflu-focus") == 1
    focused = markup.split('class="segflu-focus"', 1)[1]
    assert focused.split("</span>", 1)[0].endswith(">/")
    assert parse(markup).marks == ["Hunico / PER"]
