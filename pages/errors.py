"""Errors page: every mispredicted entity of dev or test, filterable; one click opens it in Explain."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

import pages as common
from segflu_core.errors import SegfluError


@st.cache_data(show_spinner="Finding the tagger's errors ...", max_entries=8)
def load_errors(project_path: str, split: str, _project: Any) -> pd.DataFrame:
    """Return the project's mispredicted entities of one split (cached by folder and split).

    A missing gold or predicted type (spurious and missed entities) reads as ``"O"``.
    """
    errors = _project.errors(split).reset_index(drop=True)
    errors[["gold_type", "predicted_type"]] = errors[["gold_type", "predicted_type"]].fillna("O")
    return errors


def filter_errors(errors: pd.DataFrame, *, types: list[str], kinds: list[str], text: str) -> pd.DataFrame:
    """Return the errors that match every filter given.

    A row matches when its gold or predicted type is in ``types``, its kind is
    in ``kinds`` and its surface text contains ``text`` in any case. An empty
    filter matches every row.
    """
    keep = pd.Series(True, index=errors.index)
    if types:
        keep &= errors["gold_type"].isin(types) | errors["predicted_type"].isin(types)
    if kinds:
        keep &= errors["kind"].isin(kinds)
    if text:
        keep &= errors["text"].str.contains(text, case=False, regex=False)
    return errors[keep]


def describe_error(row: pd.Series) -> str:
    """Return a one-line caption of an error for the selection box."""
    return (
        f"sentence {row['sentence']}, tokens {row['start']}-{row['end']}: "
        f"{row['text']!r} (gold {row['gold_type']}, predicted {row['predicted_type']}, {row['kind']})"
    )


def open_in_explain(split: str, row: pd.Series) -> None:
    """Store the error as the Explain page's target and switch to that page."""
    # A missed entity has no prediction of its own, so its gold label is explained.
    labels = "gold" if row["kind"] == "missed" else "predicted"
    st.session_state["explain_target"] = {
        "split": split,
        "sentence": int(row["sentence"]),
        "start": int(row["start"]),
        "end": int(row["end"]),
        "labels": labels,
    }
    st.switch_page(common.EXPLAIN_PAGE)


def show_filters(errors: pd.DataFrame) -> pd.DataFrame:
    types = sorted((set(errors["gold_type"]) | set(errors["predicted_type"])) - {"O"})
    kinds = sorted(errors["kind"].dropna().unique())
    columns = st.columns(3)
    chosen_types = columns[0].multiselect("Entity type", types, key="errors_types")
    chosen_kinds = columns[1].multiselect("Error kind", kinds, key="errors_kinds")
    text = columns[2].text_input("Surface text contains", key="errors_text")
    return filter_errors(errors, types=chosen_types, kinds=chosen_kinds, text=text)


def main() -> None:
    st.title("Errors")
    project, project_dir = common.require_project()
    split = st.radio("Split", common.EVALUATION_SPLITS, horizontal=True, key="errors_split")
    try:
        errors = load_errors(str(project_dir), split, project)
    except SegfluError as error:
        common.show_error(error)
        st.stop()
    if errors.empty:
        st.success(f"The tagger makes no entity errors on {split}.")
        st.stop()

    filtered = show_filters(errors)
    st.caption(f"{len(filtered)} of {len(errors)} mispredicted entities on {split}. Select a row to explain it.")
    event = st.dataframe(
        filtered,
        key="errors_table",
        on_select="rerun",
        selection_mode="single-row",
        hide_index=True,
        width="stretch",
    )
    if filtered.empty:
        st.info("No mispredicted entity matches these filters. Clear or change a filter to see more.")
        st.stop()

    choices = [(split, int(row)) for row in filtered.index]
    choose_error(choices, list(event.selection.rows) if event is not None else [])
    choice = st.selectbox(
        "Error to explain",
        choices,
        format_func=lambda key: describe_error(errors.loc[key[1]]),
        key="errors_choice",
    )
    if st.button("Explain this error", type="primary", key="errors_explain"):
        open_in_explain(split, errors.loc[choice[1]])


def choose_error(choices: list[tuple[str, int]], selected_rows: list[int]) -> None:
    """Set the selection box's choice before it is drawn: a newly selected table row, else the kept choice.

    Choices are ``(split, row label of the errors table)``, so a choice
    follows its error while the filters change. A choice that is no longer
    in ``choices`` falls back to the first one. That covers a split change,
    and the option text that a browser sends back after the options changed,
    which arrives as a plain string.
    """
    # The table selection contains positions in the filtered table, and the
    # browser may keep a selection from before the filters changed.
    if selected_rows and selected_rows != st.session_state.get("errors_last_selection") and selected_rows[0] < len(choices):
        st.session_state["errors_choice"] = choices[selected_rows[0]]
    st.session_state["errors_last_selection"] = selected_rows
    if st.session_state.get("errors_choice") not in choices:
        st.session_state["errors_choice"] = choices[0]


if __name__ == "__main__":
    main()
