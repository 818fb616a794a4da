"""Session state, cached loaders and checks that the pages of the app share.

The helpers live in the package's ``__init__.py`` because Streamlit lists
every other ``pages/*.py`` file as a page when it finds a ``pages`` folder
beside the main script, before ``app.py`` has called ``st.navigation``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

from segflu_core.edits import Edit, EditStore
from segflu_core.errors import SegfluError, UnsafePathError
from segflu_core.schemes import tags_to_spans

# The project folder that ``segflu app`` opens is passed in this variable.
PROJECT_ENV = "SEGFLU_PROJECT"
EVALUATION_SPLITS = ("dev", "test")
EXPLAIN_PAGE = "pages/explain.py"


def init_state() -> None:
    """Create the session state the pages share, once per browser session."""
    if "project_path" not in st.session_state:
        st.session_state["project_path"] = os.environ.get(PROJECT_ENV) or None
    if "explain_target" not in st.session_state:
        # The entity that the Explain page opens on: split, sentence, start,
        # end and the labels to explain, set by the Errors page.
        st.session_state["explain_target"] = None


@st.cache_resource(show_spinner="Loading the project ...", max_entries=4)
def load_project(path: str) -> Any:
    """Load a project folder once per server process and share it between sessions."""
    from segflu_core.project import Project

    return Project.load(path)


def require_project() -> tuple[Any, Path]:
    """Return the open project and its folder, or stop the page with a message.

    Returns
    -------
    (Project, Path)
    """
    init_state()
    path = st.session_state["project_path"]
    if not path:
        st.info("No project is open. Open or create one on the Project page.")
        st.stop()
    try:
        project = load_project(str(path))
    except SegfluError as error:
        st.error(str(error))
        st.stop()
    return project, Path(path)


def require_index(project_dir: Path) -> None:
    """Stop the page with a warning when the project's influence index has not been built."""
    if not (project_dir / "index" / "manifest.json").is_file():
        st.warning(f"The influence index of {project_dir} has not been built. Run `segflu index {project_dir}`, then reload this page.")
        st.stop()


def safe_child(base: str | os.PathLike, name: str) -> Path:
    """Return ``base / name`` resolved, and check that it lies inside ``base``.

    Raises
    ------
    UnsafePathError
        When ``name`` is empty, absolute, or leaves ``base`` through ``..`` or
        a symbolic link.
    """
    root = Path(base).expanduser().resolve()
    if not name or not name.strip():
        raise UnsafePathError(f"expected a non-empty name inside {root}, got {name!r}")
    candidate = (root / name).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise UnsafePathError(
            f"{name}: path resolves to {candidate}, outside the folder {root}; choose a plain name inside that folder"
        )
    return candidate


def edit_store(project_dir: Path) -> EditStore:
    """Open the edit database of a project."""
    return EditStore(project_dir / "edits.sqlite")


def sentence_tokens_tags(project: Any, split: str, index: int) -> tuple[list[str], list[str]]:
    """Return the words and file tags (IOB2) of one sentence of a split."""
    sentence = project.sentence(split, index)
    return list(sentence.tokens), list(sentence.tags)


def replay_edits(tags: list[str], index: int, edits: list[Edit]) -> list[str]:
    """Return a copy of sentence ``index``'s tags with its active edits in ``edits`` applied in order."""
    tags = list(tags)
    for edit in edits:
        if edit.sentence == index and not edit.undone:
            tags[edit.range_start : edit.range_end] = list(edit.new_tags)
    return tags


def current_tags(project: Any, project_dir: Path, split: str, index: int) -> list[str]:
    """Return a sentence's tags with the saved edits of that sentence applied in order."""
    _tokens, tags = sentence_tokens_tags(project, split, index)
    return replay_edits(tags, index, edit_store(project_dir).edits(split=split))


def spans_of(tags: list[str]) -> list[tuple[int, int, str]]:
    """Return the entity spans of an IOB2 tag sequence as ``(start, end, label)``."""
    return [(span.start, span.end, span.label) for span in tags_to_spans(tags)]


def entity_types(project: Any) -> list[str]:
    """Return the entity types the project's tagger predicts, sorted."""
    labels = project.labels
    return sorted({label.split("-", 1)[1] for label in labels if "-" in label})


def show_error(error: Exception) -> None:
    """Show a user-fixable error from the core as an error box."""
    st.error(str(error))
