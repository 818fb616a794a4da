"""Export of a project's corrected training file.

:func:`export_corrected` reads the project's copy of a split, replays the
active label edits of ``PROJECT/edits.sqlite`` on it and writes the result
atomically. A CoNLL export of a CoNLL file is byte-identical to the
project's copy except the tags that edits changed, which are written in the
file's own tag scheme. JSON Lines exports are written record by record by
:func:`segflu_core.formats.write_jsonl`, so their formatting may differ from
a JSON Lines source. A ``.spacy`` export is a spaCy ``DocBin`` with the
entities of the corrected IOB2 tags.

Export paths are checked before anything is written: they must resolve,
after following symlinks and ``..``, to a file inside an allowed folder, and
they replace an existing file only with ``overwrite=True``. The project's
bookkeeping files (``project.json``, ``edits.sqlite``, ``metrics.json``,
``model/``, ``index/``) are never replaced.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from segflu_core.conll import atomic_write_bytes, read_corpus
from segflu_core.edits import EditStore
from segflu_core.errors import ExportTargetExistsError, ProjectError, UnsafePathError
from segflu_core.schemes import tags_to_spans

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("conll", "jsonl", "spacy")

# Files and folders of a project folder that an export must never replace.
_PROJECT_FILES = ("project.json", "edits.sqlite", "edits.sqlite-wal", "edits.sqlite-shm", "metrics.json")
_PROJECT_FOLDERS = ("model", "index")


@dataclass(frozen=True)
class SentenceChange:
    """One sentence whose tags the active edits changed.

    Attributes
    ----------
    sentence : int
        0-based sentence position in the split's file.
    doc_id : str or None
        Document id of the sentence, where the file has documents.
    tokens : tuple of str
        The sentence's tokens.
    old_tags, new_tags : tuple of str
        IOB2 tags as read from the file and with the edits replayed.
    """

    sentence: int
    doc_id: str | None
    tokens: tuple[str, ...]
    old_tags: tuple[str, ...]
    new_tags: tuple[str, ...]

    @property
    def changed_positions(self) -> list[int]:
        """Token positions whose tag differs."""
        return [i for i, (old, new) in enumerate(zip(self.old_tags, self.new_tags)) if old != new]


@dataclass(frozen=True)
class ChangeSummary:
    """Changes that the active edits make to one split.

    Attributes
    ----------
    split : str
        The split, for example ``"train"``.
    num_edits : int
        Active (not undone) edits of the split.
    sentences_changed, tokens_changed : int
        Sentences and tokens whose tags differ from the file.
    entities_before, entities_after : dict of str to int
        Entity count per type in the file and after the edits.
    changes : tuple of SentenceChange
        The changed sentences in file order.
    """

    split: str
    num_edits: int
    sentences_changed: int
    tokens_changed: int
    entities_before: dict[str, int]
    entities_after: dict[str, int]
    changes: tuple[SentenceChange, ...]


@dataclass(frozen=True)
class ExportSummary(ChangeSummary):
    """A :class:`ChangeSummary` plus the file that was written.

    Attributes
    ----------
    path : Path
        The written file, resolved.
    format : str
        ``"conll"``, ``"jsonl"`` or ``"spacy"``.
    """

    path: Path
    format: str


def load_project_config(project_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``project.json`` of a project folder.

    Raises
    ------
    ProjectError
        When the file is missing, is not valid JSON or has no ``data`` object.
    """
    project_file = Path(project_dir) / "project.json"
    if not project_file.is_file():
        raise ProjectError(f"{project_file}: not found; pass a project folder that contains project.json")
    try:
        config = json.loads(project_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProjectError(f"{project_file}: invalid JSON ({error}); fix the file or create the project again") from error
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise ProjectError(f"{project_file}: missing the 'data' object that lists the data files of each split")
    return config


def _split_entry(config: dict[str, Any], project_dir: Path, split: str) -> dict[str, Any]:
    entry = config["data"].get(split)
    if not isinstance(entry, dict) or "path" not in entry:
        known = ", ".join(sorted(config["data"])) or "none"
        raise ProjectError(
            f"{project_dir / 'project.json'}: split {split!r} not found or has no 'path' (splits: {known}); "
            "pass one of the listed splits"
        )
    return entry


def _read_split(project_dir: Path, entry: dict[str, Any]):
    return read_corpus(
        project_dir / entry["path"],
        format=entry.get("format"),
        tag_column=entry.get("tag_column", -1),
        encoding=entry.get("encoding", "utf-8"),
        scheme=entry.get("scheme"),
    )


def _count_entities(tag_sequences: Sequence[Sequence[str]]) -> dict[str, int]:
    counts = Counter(span.label for tags in tag_sequences for span in tags_to_spans(tags))
    return dict(sorted(counts.items()))


def _corrected_tags(project_dir: Path, split: str, old_tags: list[list[str]]) -> tuple[list[list[str]], int]:
    """Return the tags with the active edits replayed and the number of active edits."""
    database = project_dir / "edits.sqlite"
    if not database.exists():
        # A project without edits has no database, and reading must not create one.
        return [list(tags) for tags in old_tags], 0
    store = EditStore(database)
    return store.apply(split, old_tags), len(store.edits(split=split))


def _summarize(split: str, corpus, old_tags: list[list[str]], new_tags: list[list[str]], num_edits: int) -> ChangeSummary:
    changes = []
    for position, (sentence, old, new) in enumerate(zip(corpus.sentences, old_tags, new_tags)):
        if old != new:
            changes.append(SentenceChange(position, sentence.doc_id, tuple(sentence.tokens), tuple(old), tuple(new)))
    return ChangeSummary(
        split=split,
        num_edits=num_edits,
        sentences_changed=len(changes),
        tokens_changed=sum(len(change.changed_positions) for change in changes),
        entities_before=_count_entities(old_tags),
        entities_after=_count_entities(new_tags),
        changes=tuple(changes),
    )


def summarize_changes(project_dir: str | os.PathLike, split: str = "train") -> ChangeSummary:
    """Summarize what the active edits change in a split of a project, without writing anything.

    Raises
    ------
    ProjectError
        When the project folder or the split is missing.
    EditStoreError
        When the edit database cannot be read.
    """
    project_dir = Path(project_dir)
    config = load_project_config(project_dir)
    corpus = _read_split(project_dir, _split_entry(config, project_dir, split))
    old_tags = [list(sentence.tags) for sentence in corpus.sentences]
    new_tags, num_edits = _corrected_tags(project_dir, split, old_tags)
    return _summarize(split, corpus, old_tags, new_tags, num_edits)


def _protected_files(config: dict[str, Any], project_dir: Path) -> dict[Path, str]:
    """Map each file that only ``overwrite=True`` may replace to a description of it."""
    protected = {}
    for split, entry in config["data"].items():
        if not isinstance(entry, dict):
            continue
        if entry.get("path"):
            protected[(project_dir / entry["path"]).resolve()] = f"the project's copy of the {split} data"
        if entry.get("source"):
            protected[Path(entry["source"]).resolve()] = f"the imported original of the {split} data"
    return protected


def _is_project_bookkeeping(target: Path, project_dir: Path) -> bool:
    if target.parent == project_dir and target.name in _PROJECT_FILES:
        return True
    return any(target.is_relative_to(project_dir / folder) for folder in _PROJECT_FOLDERS)


def check_export_path(
    out_path: str | os.PathLike,
    *,
    project_dir: str | os.PathLike,
    allowed_dirs: Sequence[str | os.PathLike],
    overwrite: bool = False,
) -> Path:
    """Return the resolved export path after checking that writing there is safe.

    Raises
    ------
    UnsafePathError
        When the path resolves outside every folder of ``allowed_dirs``, or
        names a project file that contains the project's state.
    ExportTargetExistsError
        When the file exists and ``overwrite`` is false. The message says
        whether it is the imported original or the project's data copy.
    ValueError
        When the path is a folder or its folder does not exist.
    """
    project_dir = Path(project_dir).resolve()
    target = Path(out_path).expanduser().resolve()
    roots = [Path(folder).expanduser().resolve() for folder in allowed_dirs]
    if not any(target.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise UnsafePathError(
            f"{out_path}: export path resolves to {target}, which is outside the allowed folders ({allowed}); "
            "choose a file inside one of them, or allow its folder (segflu export --allow-dir DIR, "
            "or allowed_dirs in Python)"
        )
    if _is_project_bookkeeping(target, project_dir):
        raise UnsafePathError(f"{out_path}: {target} stores the project's state; choose another file name")
    if target.is_dir():
        raise ValueError(f"expected a file path to export to, got the folder {target}")
    if not target.parent.is_dir():
        raise ValueError(f"expected an existing folder for {out_path}, got missing folder {target.parent}")
    if target.exists() and not overwrite:
        config = load_project_config(project_dir)
        what = _protected_files(config, project_dir).get(target, "an existing file")
        raise ExportTargetExistsError(
            f"{target} is {what}; choose another file, or replace it with segflu export --overwrite "
            "(overwrite=True in Python)"
        )
    return target


def _default_allowed_dirs(config: dict[str, Any], project_dir: Path, split: str) -> list[Path]:
    """Return the project folder and the folder of the split's imported original."""
    folders = [project_dir]
    source = config["data"][split].get("source")
    if source:
        folders.append(Path(source).parent)
    return folders


def _resolve_format(format: str | None, source_format: str) -> str:
    if format is None:
        # A Hugging Face dataset cannot be written back, so it is exported as JSON Lines.
        return source_format if source_format in ("conll", "jsonl") else "jsonl"
    if format not in EXPORT_FORMATS:
        raise ValueError(f"expected format to be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    return format


def write_docbin(path: str | os.PathLike, tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]) -> None:
    """Write sentences as a spaCy ``DocBin`` with entities from their IOB2 tags, atomically.

    Each sentence becomes one ``Doc`` over a blank English vocabulary with the
    tokens as given and a space after every token.
    """
    import spacy
    from spacy.tokens import Doc, DocBin
    from spacy.tokens import Span as SpacySpan

    vocab = spacy.blank("en").vocab
    doc_bin = DocBin(attrs=["ORTH", "ENT_IOB", "ENT_TYPE"])
    for sentence_tokens, sentence_tags in zip(tokens, tags):
        doc = Doc(vocab, words=list(sentence_tokens))
        doc.ents = [SpacySpan(doc, span.start, span.end, label=span.label) for span in tags_to_spans(sentence_tags)]
        doc_bin.add(doc)
    atomic_write_bytes(Path(path), doc_bin.to_bytes())


def export_corrected(
    project_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    split: str = "train",
    format: str | None = None,
    overwrite: bool = False,
    allowed_dirs: Sequence[str | os.PathLike] | None = None,
) -> ExportSummary:
    """Write a split of a project with its active label edits applied.

    Parameters
    ----------
    project_dir : str or os.PathLike
        The project folder, with ``project.json``.
    out_path : str or os.PathLike
        The file to write. Its folder must exist.
    split : str, optional
        The split to export.
    format : {"conll", "jsonl", "spacy"}, optional
        Output format. The default is the format of the split's file (JSON
        Lines for a Hugging Face dataset).
    overwrite : bool, optional
        Replace an existing file, including the imported original and the
        project's data copies. The edits are not cleared, so replaying them
        on a replaced data copy raises :class:`EditStoreError` until
        ``edits.sqlite`` is moved aside.
    allowed_dirs : sequence of path, optional
        Folders the export may be written into. The default is the project
        folder and the folder of the split's imported original.

    Returns
    -------
    ExportSummary
        Counts of edits, changed sentences and tokens, and entities per type.

    Raises
    ------
    UnsafePathError, ExportTargetExistsError, ValueError
        From :func:`check_export_path`, before anything is written.
    ProjectError
        When the project folder or the split is missing.
    """
    project_dir = Path(project_dir).resolve()
    config = load_project_config(project_dir)
    entry = _split_entry(config, project_dir, split)
    if allowed_dirs is None:
        allowed_dirs = _default_allowed_dirs(config, project_dir, split)
    target = check_export_path(out_path, project_dir=project_dir, allowed_dirs=allowed_dirs, overwrite=overwrite)

    corpus = _read_split(project_dir, entry)
    out_format = _resolve_format(format, corpus.format)
    old_tags = [list(sentence.tags) for sentence in corpus.sentences]
    new_tags, num_edits = _corrected_tags(project_dir, split, old_tags)
    summary = _summarize(split, corpus, old_tags, new_tags, num_edits)

    if out_format == "spacy":
        write_docbin(target, [sentence.tokens for sentence in corpus.sentences], new_tags)
    else:
        corpus.write(target, tags=new_tags, format=out_format)
    logger.info(
        "exported %s of %s to %s (%s): %d edits, %d sentences and %d tokens changed",
        split, project_dir, target, out_format, num_edits, summary.sentences_changed, summary.tokens_changed,
    )
    return ExportSummary(**vars(summary), path=target, format=out_format)
