"""Project page: open a project folder or create one from uploaded files, and show its metrics."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

import pages as common
from segflu_core.errors import ProjectError, SegfluError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev", "test")
UPLOAD_TYPES = ["conll", "txt", "tsv", "iob", "bio", "jsonl"]
# Upload limit per file, also enforced when the server allows larger uploads.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
# Format errors listed per uploaded file before the rest are counted only.
MAX_SHOWN_PROBLEMS = 20


def open_project_form() -> None:
    """Show the folder input that opens an existing project."""
    current = st.session_state["project_path"] or ""
    path_text = st.text_input("Project folder", value=current, key="project_open_path")
    if not st.button("Open project", key="project_open"):
        return
    folder = Path(path_text).expanduser().resolve()
    if not (folder / "project.json").is_file():
        st.error(f"{folder}: not a project folder (project.json not found); choose a folder made by segflu train or create a project below")
        return
    st.session_state["project_path"] = str(folder)
    st.rerun()


def metrics_table(split_metrics: dict[str, Any]) -> pd.DataFrame:
    """Return per-type precision, recall, F1 and support, with the micro and macro averages last."""
    rows = {name: scores for name, scores in split_metrics.get("per_type", {}).items()}
    for average in ("micro", "macro"):
        if split_metrics.get(average):
            rows[f"{average} average"] = split_metrics[average]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["precision", "recall", "f1", "support"])
    return frame.rename_axis("type").reset_index()


def confusion_frame(confusion: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Return the span confusion counts as long-form rows (gold, predicted, count)."""
    rows = [
        {"gold": gold, "predicted": predicted, "count": int(count)}
        for gold, row in confusion.items()
        for predicted, count in row.items()
    ]
    return pd.DataFrame(rows, columns=["gold", "predicted", "count"])


def confusion_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """Build the Altair heatmap of gold against predicted entity types, with the counts written in."""
    base = alt.Chart(frame).encode(
        x=alt.X("predicted:N", title="predicted type"),
        y=alt.Y("gold:N", title="gold type"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), title="spans"),
        tooltip=["gold", "predicted", "count"],
    )
    labels = base.mark_text().encode(text="count:Q")
    return cells + labels


def show_metrics(project_dir: Path) -> None:
    """Show the metrics of the open project per split: a table and the confusion matrix."""
    metrics_file = project_dir / "metrics.json"
    if not metrics_file.is_file():
        st.warning(f"{metrics_file} not found; train the project to compute its metrics.")
        return
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        st.error(f"{metrics_file}: invalid JSON ({error}); train the project again to rewrite it")
        return
    for split in common.EVALUATION_SPLITS:
        if split not in metrics:
            continue
        st.subheader(f"{split} metrics")
        columns = st.columns([3, 2])
        columns[0].dataframe(metrics_table(metrics[split]), hide_index=True, key=f"project_metrics_{split}")
        confusion = confusion_frame(metrics[split].get("confusion", {}))
        if not confusion.empty:
            columns[1].altair_chart(confusion_chart(confusion), key=f"project_confusion_{split}")


def main() -> None:
    st.title("Project")
    common.init_state()
    current = st.session_state["project_path"]
    if current:
        st.caption(f"Open project: {current}")
    open_tab, create_tab = st.tabs(["Open a project", "Create a project"])
    with open_tab:
        open_project_form()
    with create_tab:
        create_project_form()
    if current:
        show_metrics(Path(current))


# Creating a project: upload, validate, train, index.


def save_upload(upload: Any, folder: Path, split: str) -> Path:
    """Write an uploaded file into ``folder`` under a fixed name and return its path.

    The file is stored as ``SPLIT.conll`` or ``SPLIT.jsonl``, never under the
    uploaded name, so an upload cannot choose where it is written.
    """
    if upload.size > MAX_UPLOAD_BYTES:
        raise ProjectError(
            f"{upload.name}: file is {upload.size / 1e6:.1f} MB, above the {MAX_UPLOAD_BYTES / 1e6:.0f} MB limit; "
            "split it or train with segflu train on the command line"
        )
    suffix = ".jsonl" if upload.name.lower().endswith((".jsonl", ".json")) else ".conll"
    path = common.safe_child(folder, f"{split}{suffix}")
    path.write_bytes(upload.getvalue())
    return path


def validate_upload(path: Path, display_name: str) -> bool:
    """Read an uploaded file, show its format errors with line numbers, and return whether it is valid."""
    from segflu_core.conll import read_corpus_with_errors

    corpus, problems = read_corpus_with_errors(path)
    if not problems and corpus is not None and corpus.sentences:
        return True
    if corpus is not None and not corpus.sentences and not problems:
        st.error(f"{display_name}: no sentences found; upload a CoNLL or JSON Lines file with tagged tokens")
        return False
    lines = [str(problem).replace(str(path), display_name) for problem in problems[:MAX_SHOWN_PROBLEMS]]
    more = len(problems) - len(lines)
    if more > 0:
        lines.append(f"... and {more} more errors")
    st.error(f"{display_name}: {len(problems)} format errors\n\n" + "\n\n".join(f"- {line}" for line in lines))
    return False


# Share of the progress bar that training takes; indexing takes the rest.
TRAINING_SHARE = 0.7
# segflu_core.training logs one "epoch I/N: ..." message per finished epoch.
EPOCH_MESSAGE = re.compile(r"^epoch (\d+)/(\d+)")


class StatusLogHandler(logging.Handler):
    """Write the core's log messages into an ``st.status`` box and advance the progress bar per epoch.

    Only records logged by the thread that created the handler are shown, so
    a run in another browser session does not write into this box.
    """

    def __init__(self, status: Any, progress: Any):
        super().__init__(level=logging.INFO)
        self.status = status
        self.progress = progress
        self.thread_id = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id:
            return
        message = record.getMessage()
        self.status.write(message)
        epoch = EPOCH_MESSAGE.match(message)
        if epoch:
            done, total = int(epoch.group(1)), int(epoch.group(2))
            self.progress.progress(TRAINING_SHARE * done / total, text=f"Training the tagger: epoch {done} of {total} done ...")


def train_and_index(project_dir: Path, data: dict[str, Path], *, encoder: str | None, freeze_encoder: bool, epochs: int) -> None:
    """Train a tagger into ``project_dir`` on the uploaded files and build its influence index."""
    from segflu_core.demo import build_index
    from segflu_core.training import TrainConfig, train_project

    progress = st.progress(0.0, text="Training the tagger ...")
    with st.status("Training and indexing", expanded=True) as status:
        handler = StatusLogHandler(status, progress)
        core_logger = logging.getLogger("segflu_core")
        core_logger.addHandler(handler)
        previous_level = core_logger.level
        core_logger.setLevel(logging.INFO)
        try:
            config = TrainConfig(freeze_encoder=True) if freeze_encoder else TrainConfig(epochs=epochs)
            train_project(data["train"], data["dev"], data["test"], project_dir, encoder=encoder, config=config, progress=False)
            progress.progress(TRAINING_SHARE, text="Building the influence index ...")
            build_index(project_dir, progress=False)
            progress.progress(1.0, text="Done.")
            status.update(label="Training and indexing finished", state="complete")
        finally:
            core_logger.removeHandler(handler)
            core_logger.setLevel(previous_level)


def create_project_form() -> None:
    """Show the form that creates, trains and indexes a project from uploaded files."""
    default_base = str(Path(st.session_state["project_path"]).parent) if st.session_state["project_path"] else str(REPO_ROOT / "projects")
    base = st.text_input("Folder for new projects", value=default_base, key="project_new_base")
    name = st.text_input("Project name (a folder inside it)", key="project_new_name")

    uploads = {
        split: st.file_uploader(f"{split} file (CoNLL or JSON Lines)", type=UPLOAD_TYPES, key=f"project_upload_{split}")
        for split in SPLITS
    }

    encoder = st.text_input("Encoder folder or Hugging Face name (empty: the packaged MiniLM)", key="project_encoder").strip() or None
    mode = st.radio(
        "Encoder mode",
        ("frozen", "fine-tuned"),
        format_func={"frozen": "frozen (trains the CRF head only, minutes on a CPU)", "fine-tuned": "fine-tuned (slower, more accurate)"}.get,
        key="project_mode",
    )
    epochs = int(st.number_input("Fine-tuning epochs", 1, 20, 3, key="project_epochs", disabled=mode == "frozen"))

    ready = bool(name.strip()) and all(uploads.values())
    if not st.button("Create, train and index", type="primary", disabled=not ready, key="project_create"):
        return

    try:
        project_dir = common.safe_child(base, name.strip())
        if project_dir.exists() and any(project_dir.iterdir()):
            raise ProjectError(f"{project_dir}: folder exists and is not empty; choose another project name")
        # Training copies the files into the project's data/ folder, so the
        # uploads only need to live until it returns.
        with tempfile.TemporaryDirectory(prefix="segflu-upload-") as upload_dir:
            data = {split: save_upload(upload, Path(upload_dir), split) for split, upload in uploads.items()}
            valid = [validate_upload(data[split], uploads[split].name) for split in SPLITS]
            if not all(valid):
                return
            train_and_index(project_dir, data, encoder=encoder, freeze_encoder=mode == "frozen", epochs=epochs)
    except SegfluError as error:
        common.show_error(error)
        return
    st.session_state["project_path"] = str(project_dir)
    st.success(f"Created {project_dir}.")
    st.rerun()


if __name__ == "__main__":
    main()
