"""The relabel panel of the Explain page: change a training span's labels, preview, save, undo and redo.

Edits go to the project's edit database through
:class:`segflu_core.edits.EditStore`; the training file itself is never
changed, and the Review page exports the corrected file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from pages import common
from segflu_core import render
from segflu_core.errors import SegfluError

OUTSIDE = "O"


def item_caption(items: pd.DataFrame, position: int) -> str:
    """Return a caption of a shown training item for the selection box."""
    row = items.iloc[position]
    tokens = row["tokens"] if isinstance(row["tokens"], str) else " ".join(row["tokens"])
    return f"{row['role']} #{position + 1}: {tokens!r} (train sentence {row['sentence']}, gold {row['gold']})"


def choose_range(num_tokens: int, row: pd.Series) -> tuple[int, int]:
    """Return the word range to relabel, by default the item's own range."""
    # The inputs are keyed by the item, so choosing another item resets them.
    item_key = f"{row['sentence']}_{row['start']}_{row['end']}"
    columns = st.columns(2)
    start = columns[0].number_input(
        "First word", 0, num_tokens - 1, min(int(row["start"]), num_tokens - 1), key=f"explain_relabel_start_{item_key}"
    )
    end = columns[1].number_input(
        "End word (exclusive)", 1, num_tokens, max(min(int(row["end"]), num_tokens), 1), key=f"explain_relabel_end_{item_key}"
    )
    return int(start), int(end)


def show_preview(tokens: list[str], tags: list[str], changes: list[tuple[int, str, str]]) -> None:
    """Show the tags that saving would change, with neighbouring tags adjusted to stay valid."""
    if not changes:
        st.caption("These words already have this label; saving would change nothing.")
        return
    new_tags = list(tags)
    for position, _old, new in changes:
        new_tags[position] = new
    st.markdown(render.tag_change_html(tokens, tags, new_tags), unsafe_allow_html=True)


def undo_redo_buttons(project_dir: Path) -> None:
    """Show the undo and redo buttons of the edit history."""
    columns = st.columns(2)
    if columns[0].button("Undo last edit", key="explain_undo"):
        edit = common.edit_store(project_dir).undo()
        report_and_rerun("Nothing to undo." if edit is None else f"Undid edit {edit.id}.")
    if columns[1].button("Redo", key="explain_redo"):
        edit = common.edit_store(project_dir).redo()
        report_and_rerun("Nothing to redo." if edit is None else f"Redid edit {edit.id}.")


def report_and_rerun(message: str) -> None:
    """Rerun the page so every view shows the changed tags, and show ``message`` after the rerun."""
    st.session_state["explain_relabel_message"] = message
    st.rerun()


def relabel_panel(project: Any, project_dir: Path, items: pd.DataFrame, *, origin: dict) -> None:
    """Show the relabel form for the training items of an explanation.

    Parameters
    ----------
    items : DataFrame
        The explanation's training items (columns sentence, start, end,
        tokens, gold, role); all come from the train split.
    origin : dict
        The explanation the items come from, stored with each edit.
    """
    st.subheader("Relabel a training item")
    message = st.session_state.pop("explain_relabel_message", None)
    if message:
        st.success(message)
    if items.empty:
        st.caption("No training items to relabel.")
        return
    try:
        position = st.selectbox("Training item", range(len(items)), format_func=lambda i: item_caption(items, i), key="explain_relabel_item")
        row = items.iloc[position]
        sentence = int(row["sentence"])
        tokens, _file_tags = common.sentence_tokens_tags(project, "train", sentence)
        tags = common.current_tags(project, project_dir, "train", sentence)
        start, end = choose_range(len(tokens), row)
        label = st.selectbox("New label", [OUTSIDE, *common.entity_types(project)], key="explain_relabel_label")
        if not start < end:
            st.warning(f"expected the first word before the end word, got [{start}, {end})")
            return
        store = common.edit_store(project_dir)
        changes = store.preview(tags, start, end, label)
        show_preview(tokens, tags, changes)
        note = st.text_input("Note (optional)", key="explain_relabel_note")
        if st.button("Save relabel", type="primary", disabled=not changes, key="explain_relabel_save"):
            edit = store.relabel("train", sentence, start, end, label, current_tags=tags, note=note, origin=origin, doc=_doc(row))
            report_and_rerun(f"Saved edit {edit.id}: train sentence {sentence} [{start}, {end}) is now {label}.")
        undo_redo_buttons(project_dir)
    except SegfluError as error:
        common.show_error(error)


def _doc(row: pd.Series) -> str | None:
    doc = row.get("doc")
    return None if doc is None or pd.isna(doc) or str(doc) == "" else str(doc)
