"""Review page: every label edit with filters, undo per edit, what export changes, and the download."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

import pages as common
from segflu_core import render
from segflu_core.correction import metrics_table, retrain
from segflu_core.edits import Edit
from segflu_core.errors import IndexNotBuiltError, SegfluError
from segflu_core.export import EXPORT_FORMATS, export_corrected, summarize_changes

SPLITS = ("train", "dev", "test")
FILE_SUFFIXES = {"conll": ".conll", "jsonl": ".jsonl", "spacy": ".spacy"}
MIME_TYPES = {"conll": "text/plain", "jsonl": "application/jsonl", "spacy": "application/octet-stream"}
# Changed sentences shown with their tags before and after export.
MAX_SHOWN_CHANGES = 50


def edits_frame(edits: list[Edit]) -> pd.DataFrame:
    """Return one row per edit for the edits table."""
    rows = [
        {
            "id": edit.id,
            "time (UTC)": edit.created_at,
            "split": edit.split,
            "sentence": edit.sentence,
            "start": edit.start,
            "end": edit.end,
            "label": edit.label or "O",
            "old tags": " ".join(edit.old_tags),
            "new tags": " ".join(edit.new_tags),
            "note": edit.note,
            "undone": edit.undone,
        }
        for edit in edits
    ]
    return pd.DataFrame(rows, columns=["id", "time (UTC)", "split", "sentence", "start", "end", "label", "old tags", "new tags", "note", "undone"])


def show_edits(project_dir: Path, split: str) -> None:
    """Show the filterable edits table of a split and the undo-one-edit control."""
    store = common.edit_store(project_dir)
    columns = st.columns(3)
    label = columns[0].text_input("Label set to (type or O)", key="review_label").strip() or None
    note = columns[1].text_input("Note contains", key="review_note").strip() or None
    include_undone = columns[2].toggle("Show undone edits", key="review_include_undone")
    edits = store.edits(split=split, label=label, note_contains=note, include_undone=include_undone)
    st.dataframe(edits_frame(edits), hide_index=True, width="stretch", key="review_edits_table")
    active = [edit for edit in edits if not edit.undone]
    if not active:
        return
    columns = st.columns([3, 1])
    edit_id = columns[0].selectbox(
        "Edit to undo",
        [edit.id for edit in active],
        format_func=lambda i: f"edit {i}",
        key="review_undo_choice",
    )
    if columns[1].button("Undo this edit", key="review_undo"):
        try:
            store.undo_edit(edit_id)
            follow_edits(project_dir)
        except (SegfluError, ValueError) as error:
            common.show_error(error)
        else:
            st.rerun()


def follow_edits(project_dir: Path) -> None:
    """Update the shared project's index to the edited labels, so the next explanation uses them."""
    try:
        common.load_project(str(project_dir)).apply_edits()
    except IndexNotBuiltError:
        # Without an index there is nothing to update; building it reads the edited labels.
        return


def show_retrain(project_dir: Path) -> None:
    """Show the Retrain control and the metrics before and after the last retraining."""
    mode = st.radio(
        "Train",
        ("head", "full"),
        format_func={"head": "emission layer and CRF on the stored features (fast)", "full": "the whole tagger (slow)"}.get,
        horizontal=True,
        key="review_retrain_mode",
    )
    if st.button("Retrain on corrected labels", key="review_retrain"):
        try:
            with st.spinner("Retraining and rebuilding the index ..."):
                st.session_state["review_retrain_result"] = retrain(project_dir, mode=mode)
        except (SegfluError, ValueError) as error:
            common.show_error(error)
        # The cached project, predictions and explanations belong to the previous model.
        common.load_project.clear()
        st.cache_data.clear()
    result = st.session_state.get("review_retrain_result")
    if result:
        st.caption(f"Previous model kept in {result['previous_model']}.")
        st.dataframe(pd.DataFrame(metrics_table(result)), hide_index=True, key="review_retrain_metrics")


def show_summary(project_dir: Path, split: str) -> None:
    """Show what exporting the split would change: counts, entities per type and changed sentences."""
    summary = summarize_changes(project_dir, split)
    columns = st.columns(3)
    columns[0].metric("Active edits", summary.num_edits)
    columns[1].metric("Sentences changed", summary.sentences_changed)
    columns[2].metric("Tags changed", summary.tokens_changed)
    types = sorted(set(summary.entities_before) | set(summary.entities_after))
    counts = pd.DataFrame(
        {
            "type": types,
            "entities in file": [summary.entities_before.get(name, 0) for name in types],
            "entities after export": [summary.entities_after.get(name, 0) for name in types],
        }
    )
    st.dataframe(counts, hide_index=True, key="review_entity_counts")
    for change in summary.changes[:MAX_SHOWN_CHANGES]:
        st.markdown(f"**{split} sentence {change.sentence}**")
        st.markdown(render.tag_change_html(change.tokens, change.old_tags, change.new_tags), unsafe_allow_html=True)
    if len(summary.changes) > MAX_SHOWN_CHANGES:
        st.caption(f"{len(summary.changes) - MAX_SHOWN_CHANGES} more changed sentences are not shown.")


@st.cache_data(show_spinner="Exporting ...", max_entries=8)
def export_bytes(project_dir: Path, split: str, out_format: str, edits_state: tuple) -> tuple[bytes, str]:
    """Export the corrected split into a temporary folder and return the file's bytes and name.

    ``edits_state`` lists ``(id, undone)`` of every edit of the split; it
    keys the cache, so the file is exported again whenever an edit changes.
    """
    file_name = f"{split}.corrected{FILE_SUFFIXES[out_format]}"
    with tempfile.TemporaryDirectory(prefix="segflu-export-") as folder:
        summary = export_corrected(project_dir, Path(folder) / file_name, split=split, format=out_format, allowed_dirs=[folder])
        return summary.path.read_bytes(), file_name


def show_download(project_dir: Path, split: str) -> None:
    """Show the format choice and the download button of the corrected file."""
    out_format = st.radio("Format", EXPORT_FORMATS, horizontal=True, key="review_format")
    edits_state = tuple((edit.id, edit.undone) for edit in common.edit_store(project_dir).edits(split=split, include_undone=True))
    data, file_name = export_bytes(project_dir, split, out_format, edits_state)
    st.download_button(
        f"Download {file_name}",
        data=data,
        file_name=file_name,
        mime=MIME_TYPES[out_format],
        type="primary",
        key="review_download",
    )


def main() -> None:
    st.title("Review")
    common.init_state()
    if not st.session_state["project_path"]:
        st.info("No project is open. Open or create one on the Project page.")
        st.stop()
    project_dir = Path(st.session_state["project_path"])
    split = st.radio("Split", SPLITS, horizontal=True, key="review_split")
    try:
        st.subheader("Edits")
        show_edits(project_dir, split)
        st.subheader("What export changes")
        show_summary(project_dir, split)
        st.subheader("Corrected file")
        show_download(project_dir, split)
        st.subheader("Retrain")
        show_retrain(project_dir)
    except SegfluError as error:
        common.show_error(error)


if __name__ == "__main__":
    main()
