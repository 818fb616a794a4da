"""Noise page: training documents ranked by how likely their annotations are wrong.

Where the user supplies a clean reference copy of the training file, the
documents whose tags differ from it are the truly noisy ones, and the page
plots the fraction of them found against the fraction of documents inspected.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

import pages as common
from segflu_core.errors import SegfluError
from segflu_core.influence.noise import AGGREGATES, METHODS, VALIDATION_METHODS

METHOD_CAPTIONS = {
    "sentence-loss": "sentence loss",
    "word-loss": "word loss",
    "entropy": "marginal entropy",
    "grad-norm": "gradient norm",
    "segment-influence": "segment influence on clean documents",
    "instance-influence": "instance influence on clean documents",
    "nn": "nearest neighbours in clean documents",
}


@st.cache_data(show_spinner="Ranking the training documents ...", max_entries=16)
def rank(project_path: str, method: str, aggregate: str, _project: Any) -> pd.DataFrame:
    """Return the ranked training documents of one method (cached by folder, method and aggregate)."""
    return _project.rank_noise(method, aggregate=aggregate)


def noisy_documents(train_sentences: list, reference_sentences: list) -> set[int]:
    """Return the documents with a sentence whose tags differ from the clean reference.

    Raises
    ------
    ValueError
        When the reference has another number of sentences or other tokens.
    """
    if len(reference_sentences) != len(train_sentences):
        raise ValueError(
            f"expected a reference with the training file's {len(train_sentences)} sentences, got {len(reference_sentences)}"
        )
    noisy = set()
    for position, (sentence, reference) in enumerate(zip(train_sentences, reference_sentences)):
        if list(sentence.tokens) != list(reference.tokens):
            raise ValueError(f"expected the same tokens as training sentence {position}, got {' '.join(reference.tokens)!r}")
        if list(sentence.tags) != list(reference.tags):
            noisy.add(int(sentence.doc))
    return noisy


def fraction_found(ranked_docs: list[int], noisy: set[int]) -> pd.DataFrame:
    """Return the curve of noisy documents found while inspecting the ranking from the top.

    Returns
    -------
    DataFrame
        Columns ``inspected`` and ``found``, both fractions in [0, 1], one row
        per inspected document plus the origin.
    """
    found = 0
    rows = [{"inspected": 0.0, "found": 0.0}]
    for position, doc in enumerate(ranked_docs, start=1):
        found += doc in noisy
        rows.append({"inspected": position / len(ranked_docs), "found": found / len(noisy)})
    return pd.DataFrame(rows)


def read_reference(upload: Any) -> list:
    """Read an uploaded clean reference file and return its sentences."""
    from segflu_core.conll import read_corpus

    suffix = ".jsonl" if upload.name.lower().endswith((".jsonl", ".json")) else ".conll"
    with tempfile.TemporaryDirectory(prefix="segflu-reference-") as folder:
        path = Path(folder) / f"reference{suffix}"
        path.write_bytes(upload.getvalue())
        return read_corpus(path).sentences


def curve_chart(curve: pd.DataFrame) -> alt.LayerChart:
    """Build the fraction-found line with the diagonal that a random order reaches on average."""
    line = alt.Chart(curve).mark_line().encode(
        x=alt.X("inspected:Q", title="fraction of documents inspected"),
        y=alt.Y("found:Q", title="fraction of noisy documents found"),
    )
    diagonal = alt.Chart(pd.DataFrame({"inspected": [0.0, 1.0], "found": [0.0, 1.0]})).mark_line(strokeDash=[4, 4], color="gray").encode(
        x="inspected:Q", y="found:Q"
    )
    return line + diagonal


def show_curve(project: Any, ranking: pd.DataFrame) -> None:
    """Show the fraction-found curve when the user uploads a clean reference of the training file."""
    upload = st.file_uploader(
        "Clean reference of the training file (optional; CoNLL or JSON Lines)",
        type=["conll", "txt", "tsv", "iob", "bio", "jsonl"],
        key="noise_reference",
    )
    if upload is None:
        st.caption("Upload the clean version of the training file to see how fast this ranking finds the noisy documents.")
        return
    try:
        noisy = noisy_documents(project.sentences("train"), read_reference(upload))
    except (SegfluError, ValueError) as error:
        common.show_error(error)
        return
    if not noisy:
        st.info("The reference has the same tags as the training file, so no document is noisy.")
        return
    curve = fraction_found([int(doc) for doc in ranking["doc"]], noisy)
    st.caption(f"{len(noisy)} of {len(ranking)} documents differ from the reference.")
    st.altair_chart(curve_chart(curve), key="noise_curve")


def main() -> None:
    st.title("Noise")
    project, project_dir = common.require_project()
    common.require_index(project_dir)
    columns = st.columns(2)
    method = columns[0].selectbox("Method", METHODS, format_func=METHOD_CAPTIONS.get, key="noise_method")
    aggregate = columns[1].radio("Document score", AGGREGATES, horizontal=True, format_func=lambda x: f"{x} over its items", key="noise_aggregate")
    if method in VALIDATION_METHODS:
        st.caption("This method compares the training words with documents whose labels are taken as clean.")
    try:
        ranking = rank(str(project_dir), method, aggregate, project)
    except SegfluError as error:
        common.show_error(error)
        st.stop()
    st.dataframe(ranking, hide_index=True, width="stretch", key="noise_table")
    show_curve(project, ranking)


if __name__ == "__main__":
    main()
