"""Validate page: approximate influence against exact retraining, as written by ``segflu validate``.

``segflu validate PROJECT`` writes its results into ``PROJECT/validation``,
or the folder that ``--out`` names. ``pairs.csv`` has one row per test word and
removed training word, with the ``predicted`` and ``actual`` change of the
test loss. ``summary.json`` has the Pearson and Spearman correlations, the
sign agreement and the number of pairs, and ``scatter.png`` plots the pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

import pages as common
from segflu_core.errors import SegfluError

DEFAULT_FOLDER = "validation"
SUMMARY_CAPTIONS = {"pearson": "Pearson r", "spearman": "Spearman ρ", "sign_agreement": "sign agreement", "n": "pairs"}


def scatter_chart(pairs: pd.DataFrame) -> alt.Chart:
    """Build the scatter of predicted against actual loss changes, with the diagonal y = x as reference."""
    low = float(min(pairs["predicted"].min(), pairs["actual"].min()))
    high = float(max(pairs["predicted"].max(), pairs["actual"].max()))
    points = alt.Chart(pairs).mark_circle(size=40, opacity=0.6).encode(
        x=alt.X("predicted:Q", title="predicted change of test loss (influence)"),
        y=alt.Y("actual:Q", title="actual change after retraining"),
        tooltip=list(pairs.columns),
    )
    diagonal = alt.Chart(pd.DataFrame({"predicted": [low, high], "actual": [low, high]})).mark_line(color="gray", strokeDash=[4, 4]).encode(
        x="predicted:Q", y="actual:Q"
    )
    return points + diagonal


def show_summary(summary: dict) -> None:
    """Show the correlations of ``summary.json`` as metrics."""
    present_keys = [key for key in SUMMARY_CAPTIONS if key in summary]
    if not present_keys:
        st.json(summary)
        return
    columns = st.columns(len(present_keys))
    for column, key in zip(columns, present_keys):
        value = summary[key]
        column.metric(SUMMARY_CAPTIONS[key], f"{value:.3f}" if isinstance(value, float) else str(value))


def show_validation(folder: Path) -> None:
    """Show the summary, the scatter plot and the pairs of one validation folder."""
    summary_file, pairs_file = folder / "summary.json", folder / "pairs.csv"
    if not summary_file.is_file() and not pairs_file.is_file():
        st.info(f"No validation results in {folder}. Run `segflu validate {folder.parent}` to write them.")
        return
    if summary_file.is_file():
        try:
            show_summary(json.loads(summary_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            st.error(f"{summary_file}: invalid JSON ({error}); run segflu validate again to rewrite it")
    if not pairs_file.is_file():
        return
    pairs = pd.read_csv(pairs_file)
    if {"predicted", "actual"} <= set(pairs.columns) and not pairs.empty:
        st.altair_chart(scatter_chart(pairs), key="validate_scatter")
    elif (folder / "scatter.png").is_file():
        st.image(str(folder / "scatter.png"))
    st.dataframe(pairs, hide_index=True, width="stretch", key="validate_pairs")


def main() -> None:
    st.title("Validate")
    _project, project_dir = common.require_project()
    name = st.text_input("Results folder inside the project", value=DEFAULT_FOLDER, key="validate_folder")
    try:
        folder = common.safe_child(project_dir, name.strip())
    except SegfluError as error:
        common.show_error(error)
        st.stop()
    show_validation(folder)


if __name__ == "__main__":
    main()
