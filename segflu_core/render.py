"""HTML snippets for the app: sentences with highlighted entities and training items.

Every string that comes from a dataset (tokens, labels, document ids, notes)
goes through :func:`escape` before it is placed in markup, so a token such as
``<script>alert(1)</script>`` shows as text when the app passes the result to
``st.markdown(..., unsafe_allow_html=True)``. Every snippet is a single line,
and the ones meant for ``st.markdown`` start with ``<div``, so Markdown treats
them as one raw HTML block and does not interpret ``*``, ``_`` or backticks
inside tokens.

The functions here build strings only and import nothing from Streamlit, so
they can be tested without a running app.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Iterable, Sequence
from typing import Any

# Light background colours for entity types. A hash of the type name picks the
# colour, so a type keeps its colour across pages and runs.
PALETTE = (
    "#fde68a",
    "#bfdbfe",
    "#bbf7d0",
    "#fecaca",
    "#ddd6fe",
    "#fed7aa",
    "#a5f3fc",
    "#f5d0fe",
)

# A labelled span: (start, end, label) with a half-open token range [start, end).
SpanTuple = tuple[int, int, str]


def escape(text: Any) -> str:
    """Escape a dataset string for HTML and keep it on one line.

    Newlines become character references, because a blank line would end the
    raw HTML block and hand the rest of the snippet to the Markdown parser.
    """
    escaped = html.escape(str(text), quote=True)
    return escaped.replace("\r", "&#13;").replace("\n", "&#10;")


def label_color(label: str) -> str:
    """Return the background colour of an entity type, stable across runs."""
    digest = hashlib.sha1(label.encode("utf-8")).digest()
    return PALETTE[digest[0] % len(PALETTE)]


def as_span_tuples(spans: Iterable[Any]) -> list[SpanTuple]:
    """Convert spans to ``(start, end, label)`` tuples.

    Parameters
    ----------
    spans : iterable
        ``Span``-like objects with ``start``, ``end`` and ``label`` attributes,
        or ``(start, end, label)`` tuples.

    Returns
    -------
    list of (int, int, str)
        The spans sorted by start offset.
    """
    result: list[SpanTuple] = []
    for span in spans:
        if hasattr(span, "start") and hasattr(span, "end"):
            label = getattr(span, "label", None) or getattr(span, "type", "")
            result.append((int(span.start), int(span.end), str(label)))
        else:
            start, end, label = span
            result.append((int(start), int(end), str(label)))
    return sorted(result)


def _token_owner(num_tokens: int, spans: Sequence[SpanTuple]) -> list[int | None]:
    # Index of the span that covers each token; the first span wins on overlap.
    owner: list[int | None] = [None] * num_tokens
    for index, (start, end, _label) in enumerate(spans):
        for position in range(max(start, 0), min(end, num_tokens)):
            if owner[position] is None:
                owner[position] = index
    return owner


FOCUS_STYLE = "outline:2px solid #dc2626;border-radius:0.3em"


def _token_html(tokens: Sequence[str], position: int, focus: tuple[int, int] | None) -> str:
    # An outlined token is wrapped on its own, so a focus inside an entity
    # outlines only the focused words of that entity.
    text = escape(tokens[position])
    if focus is not None and focus[0] <= position < focus[1]:
        return f'<span class="segflu-focus" style="{FOCUS_STYLE}">{text}</span>'
    return text


def _entity_html(tokens: Sequence[str], start: int, end: int, label: str, focus: tuple[int, int] | None) -> str:
    text = " ".join(_token_html(tokens, position, focus) for position in range(start, end))
    return (
        f'<mark class="segflu-entity" style="background:{label_color(label)};'
        f'padding:0 0.25em;border-radius:0.3em">{text}'
        f' <sub style="font-size:0.7em;font-weight:600">{escape(label)}</sub></mark>'
    )


def tokens_html(
    tokens: Sequence[str],
    spans: Iterable[Any] = (),
    *,
    focus: tuple[int, int] | None = None,
) -> str:
    """Render a sentence with its entity spans highlighted.

    Parameters
    ----------
    tokens : sequence of str
        The words of the sentence.
    spans : iterable
        Entity spans over ``tokens`` (see :func:`as_span_tuples`).
    focus : (int, int), optional
        A half-open token range ``[start, end)`` whose words are outlined,
        such as the training item or prediction under discussion.

    Returns
    -------
    str
        One ``<span>`` element, with every token escaped.
    """
    span_tuples = as_span_tuples(spans)
    owner = _token_owner(len(tokens), span_tuples)
    parts = []
    position = 0
    # Walk the sentence in runs: an entity span, or a single outside token.
    while position < len(tokens):
        index = owner[position]
        if index is None:
            parts.append(_token_html(tokens, position, focus))
            position += 1
            continue
        _start, end, label = span_tuples[index]
        end = min(end, len(tokens))
        parts.append(_entity_html(tokens, position, end, label, focus))
        position = end
    return '<span class="segflu-tokens" style="line-height:2">' + " ".join(parts) + "</span>"


def sentence_html(
    tokens: Sequence[str],
    gold_spans: Iterable[Any] | None = None,
    predicted_spans: Iterable[Any] | None = None,
    *,
    focus: tuple[int, int] | None = None,
) -> str:
    """Render a sentence with its gold entities, its predicted entities, or both.

    A layer passed as ``None`` gets no row, so free text without gold labels
    shows the predicted row only.

    Returns
    -------
    str
        A single-line ``<div>`` with one row per annotation layer.
    """
    rows = []
    for name, spans in (("gold", gold_spans), ("predicted", predicted_spans)):
        if spans is not None:
            rows.append(_layer_row(name, tokens_html(tokens, spans, focus=focus)))
    return '<div class="segflu-sentence">' + "".join(rows) + "</div>"


def _layer_row(name: str, body: str) -> str:
    return (
        '<div style="margin:0.2em 0"><span style="display:inline-block;width:6em;'
        f'color:#6b7280;font-size:0.85em">{escape(name)}</span>{body}</div>'
    )


def conflict_badge(conflict: bool) -> str:
    """Return the badge that flags a training item whose label disagrees with the prediction."""
    if not conflict:
        return ""
    return (
        '<span class="segflu-conflict" style="background:#dc2626;color:white;'
        'padding:0 0.4em;border-radius:0.6em;font-size:0.75em;margin-left:0.5em">conflict</span>'
    )


def item_html(
    tokens: Sequence[str],
    gold_spans: Iterable[Any],
    *,
    start: int,
    end: int,
    score: float,
    title: str,
    conflict: bool = False,
) -> str:
    """Render one training item in the context of its sentence.

    Parameters
    ----------
    tokens : sequence of str
        The words of the training sentence.
    gold_spans : iterable
        The gold entity spans of that sentence.
    start, end : int
        The item's half-open token range ``[start, end)``; outlined.
    score : float
        The item's influence or similarity score.
    title : str
        A caption such as the split and sentence number; escaped.
    conflict : bool
        Whether to show the conflict badge.

    Returns
    -------
    str
        A single-line ``<div>``.
    """
    header = (
        f'<div style="font-size:0.8em;color:#6b7280">{escape(title)}'
        f" &middot; score {escape(f'{score:.4g}')}{conflict_badge(conflict)}</div>"
    )
    body = tokens_html(tokens, gold_spans, focus=(start, end))
    return (
        '<div class="segflu-item" style="border:1px solid #e5e7eb;border-radius:0.4em;'
        f'padding:0.3em 0.6em;margin:0.3em 0">{header}{body}</div>'
    )


def tag_change_html(tokens: Sequence[str], old_tags: Sequence[str], new_tags: Sequence[str]) -> str:
    """Render the tags of a sentence before and after an edit, with changed tags in bold red.

    Returns
    -------
    str
        A single-line ``<div>`` holding a three-row table: token, old tag, new tag.
    """
    if not len(tokens) == len(old_tags) == len(new_tags):
        raise ValueError(
            f"expected tokens, old tags and new tags of equal length, got "
            f"{len(tokens)}, {len(old_tags)} and {len(new_tags)}"
        )
    cells = {"token": [], "before": [], "after": []}
    for token, old, new in zip(tokens, old_tags, new_tags):
        changed = old != new
        style = ' style="color:#dc2626;font-weight:700"' if changed else ""
        cells["token"].append(f"<td>{escape(token)}</td>")
        cells["before"].append(f"<td>{escape(old)}</td>")
        cells["after"].append(f"<td{style}>{escape(new)}</td>")
    rows = "".join(f"<tr><th>{name}</th>{''.join(row)}</tr>" for name, row in cells.items())
    return f'<div class="segflu-tag-change" style="overflow-x:auto"><table>{rows}</table></div>'
