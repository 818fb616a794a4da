"""The label edit store: every relabelled span of a project, in SQLite.

An :class:`EditStore` keeps the edits of one project in ``PROJECT/edits.sqlite``.
The data files are never changed in place. The current tags of a split are its
file's tags with the active edits replayed in the order they were made
(:meth:`EditStore.apply`), and :mod:`segflu_core.export` writes them out.

Durability: the database runs in WAL mode with ``synchronous=FULL``, and each
edit is committed in its own ``BEGIN IMMEDIATE`` transaction before the call
returns. An edit whose call has returned therefore survives a browser reload,
a server restart and a killed process. Two processes may write at once: the
second waits for the first (up to the busy timeout) instead of losing a write.

An edit stores the old and new tags of the whole range it changed, which
includes neighbouring tags that :func:`segflu_core.schemes.relabel_span`
adjusted to keep the sequence valid. Tags are IOB2, the scheme that
:mod:`segflu_core.conll` reads every file into.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import sqlite3
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from segflu_core.errors import EditConflictError, EditStoreError
from segflu_core.schemes import relabel_span

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    split TEXT NOT NULL,
    sentence INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    range_start INTEGER NOT NULL,
    old_tags TEXT NOT NULL,
    new_tags TEXT NOT NULL,
    label TEXT,
    note TEXT NOT NULL DEFAULT '',
    origin TEXT,
    doc TEXT,
    undone INTEGER NOT NULL DEFAULT 0,
    redo_order INTEGER
);
CREATE INDEX IF NOT EXISTS edits_by_sentence ON edits (split, sentence);
CREATE TABLE IF NOT EXISTS base_tags (
    split TEXT NOT NULL,
    sentence INTEGER NOT NULL,
    tags TEXT NOT NULL,
    PRIMARY KEY (split, sentence)
);
"""

_COLUMNS = (
    'id, created_at, split, sentence, start, "end", range_start, old_tags, new_tags, '
    "label, note, origin, doc, undone"
)


@dataclass(frozen=True)
class Edit:
    """One relabelled span and the tags it changed.

    Attributes
    ----------
    id : int
        Position in the edit history, increasing with time.
    created_at : str
        UTC time of the edit in ISO 8601.
    split : str
        Data split, for example ``"train"``.
    sentence : int
        0-based sentence position in the split's file.
    start, end : int
        The relabelled span ``[start, end)`` in tokens.
    range_start : int
        First token of the changed range. The range is
        ``[range_start, range_start + len(new_tags))`` and covers the span plus
        any neighbouring tags that were adjusted.
    old_tags, new_tags : tuple of str
        IOB2 tags of the changed range before and after the edit.
    label : str or None
        The entity type the span was set to, or ``None`` for ``O``.
    note : str
        Free text the annotator attached.
    origin : dict or None
        The explanation the edit came from (split, sentence, start, end, method, ...).
    doc : str or None
        Document id of the sentence, when the caller passed one.
    undone : bool
        Whether the edit is undone and left out of :meth:`EditStore.apply`.
    """

    id: int
    created_at: str
    split: str
    sentence: int
    start: int
    end: int
    range_start: int
    old_tags: tuple[str, ...]
    new_tags: tuple[str, ...]
    label: str | None
    note: str
    origin: dict[str, Any] | None
    doc: str | None
    undone: bool

    @property
    def range_end(self) -> int:
        """End (exclusive) of the changed range."""
        return self.range_start + len(self.new_tags)

    def overlaps(self, other: Edit) -> bool:
        """Return whether both edits changed tags of a common token."""
        same_sentence = (self.split, self.sentence) == (other.split, other.sentence)
        return same_sentence and self.range_start < other.range_end and other.range_start < self.range_end


def _edit_from_row(row: tuple) -> Edit:
    (id_, created_at, split, sentence, start, end, range_start, old_tags, new_tags, label, note, origin, doc, undone) = row
    return Edit(
        id=id_,
        created_at=created_at,
        split=split,
        sentence=sentence,
        start=start,
        end=end,
        range_start=range_start,
        old_tags=tuple(json.loads(old_tags)),
        new_tags=tuple(json.loads(new_tags)),
        label=label,
        note=note,
        origin=json.loads(origin) if origin is not None else None,
        doc=doc,
        undone=bool(undone),
    )


def _changed_range(old: Sequence[str], new: Sequence[str], start: int, end: int) -> tuple[int, int]:
    """Return the smallest ``[first, last)`` that contains ``[start, end)`` and every changed position."""
    changed = [i for i, (before, after) in enumerate(zip(old, new)) if before != after]
    first = min([start, *changed])
    last = max([end, *(i + 1 for i in changed)])
    return first, last


def _replay(tags: list[str], edits: Sequence[Edit]) -> list[str]:
    for edit in edits:
        tags[edit.range_start : edit.range_end] = edit.new_tags
    return tags


def _is_read_only(path: Path) -> bool:
    """Return whether the file has no write permission bits.

    The bits are checked directly because ``os.access`` grants root every
    write, and a file marked read-only must stay untouched for root as well.
    """
    if not path.exists():
        return False
    return not (stat.S_IMODE(path.stat().st_mode) & 0o222) or not os.access(path, os.W_OK)


def _translate_error(path: Path, error: sqlite3.Error) -> EditStoreError:
    """Build an :class:`EditStoreError` that names the cause of ``error`` and the fix."""
    text = str(error).lower()
    if "locked" in text or "busy" in text:
        advice = (
            "it is locked by another process for longer than the busy timeout; "
            "close other segflu sessions that write to this project, then retry"
        )
    elif "readonly" in text or "read-only" in text or "unable to open" in text:
        advice = (
            "it cannot be written (read-only file or folder); make the file and its "
            "folder writable, or copy the project to a writable folder"
        )
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        advice = (
            "the file is damaged; move it aside (for example to edits.sqlite.damaged) to start "
            "a new edit history, and keep the moved file, because sqlite3's .recover command "
            "may still restore its edits"
        )
    else:
        advice = "see the log for the SQLite error"
    return EditStoreError(f"{path}: edit database failed ({error}): {advice}")


class EditStore:
    """Label edits of one project, stored in an SQLite file.

    Parameters
    ----------
    path : str or os.PathLike
        The database file, normally ``PROJECT/edits.sqlite``. It is created
        when missing, and its folder must exist.
    busy_timeout_s : float, optional
        Seconds a write waits for another process's transaction before it
        raises :class:`EditStoreError`.

    Notes
    -----
    Each call opens its own connection, so one store may be shared between
    threads (Streamlit reruns a page script on another thread).
    A file without write permission bits is opened read-only, also for root:
    edits can be listed and applied, and every write raises
    :class:`EditStoreError`.
    """

    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 10.0):
        if busy_timeout_s <= 0:
            raise ValueError(f"expected a positive busy_timeout_s, got {busy_timeout_s}")
        self.path = Path(path)
        self.busy_timeout_s = float(busy_timeout_s)
        if not self.path.parent.is_dir():
            raise EditStoreError(f"{self.path}: folder {self.path.parent} not found; create the project folder first")
        self._initialize()

    def __repr__(self) -> str:
        return f"EditStore({str(self.path)!r})"

    @property
    def read_only(self) -> bool:
        """Whether the database file is marked read-only."""
        return _is_read_only(self.path)

    def _initialize(self) -> None:
        if self.read_only:
            # Reading the table checks that the file is an edit database.
            with self._transaction(write=False) as connection:
                connection.execute("SELECT count(*) FROM edits").fetchone()
            return
        try:
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            try:
                # WAL mode is stored in the file, so setting it once is enough.
                connection.execute("PRAGMA journal_mode = WAL").fetchone()
            finally:
                connection.close()
        except sqlite3.Error as error:
            logger.error("cannot open edit database %s: %s", self.path, error)
            raise _translate_error(self.path, error) from error
        with self._transaction(write=True) as connection:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            connection = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_s, isolation_level=None)
        else:
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        connection.execute("PRAGMA synchronous = FULL")
        return connection

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """Run the block in one transaction and commit it before returning.

        ``BEGIN IMMEDIATE`` takes the write lock at the start, so two
        processes that read and then write the same rows run one after the other.
        """
        if write and self.read_only:
            raise EditStoreError(
                f"{self.path}: edit database is read-only, so the change was not saved; "
                "make the file writable (chmod u+w) and retry"
            )
        try:
            connection = self._connect()
        except sqlite3.Error as error:
            logger.error("cannot open edit database %s: %s", self.path, error)
            raise _translate_error(self.path, error) from error
        try:
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield connection
            connection.execute("COMMIT")
        except sqlite3.Error as error:
            logger.error("edit database %s failed, transaction rolled back: %s", self.path, error)
            _rollback(connection)
            raise _translate_error(self.path, error) from error
        except BaseException:
            _rollback(connection)
            raise
        finally:
            connection.close()

    def preview(self, current_tags: Sequence[str], start: int, end: int, label: str | None) -> list[tuple[int, str, str]]:
        """Return ``(position, old_tag, new_tag)`` for each tag that relabelling would change.

        Nothing is saved. ``label`` ``None`` or ``"O"`` removes the entity.
        """
        start, end = _check_span(current_tags, start, end)
        new_tags = relabel_span(list(current_tags), start, end, _normalize_label(label))
        return [(i, old, new) for i, (old, new) in enumerate(zip(current_tags, new_tags)) if old != new]

    def relabel(
        self,
        split: str,
        sentence: int,
        start: int,
        end: int,
        label: str | None,
        *,
        current_tags: Sequence[str],
        note: str = "",
        origin: dict[str, Any] | None = None,
        doc: str | None = None,
    ) -> Edit:
        """Set tokens ``[start, end)`` of a sentence to one entity of type ``label`` and save the edit.

        Parameters
        ----------
        split, sentence : str, int
            The split and the 0-based sentence position.
        start, end : int
            The span, half-open.
        label : str or None
            The new entity type, or ``None`` (or ``"O"``) to remove the entity.
        current_tags : sequence of str
            The sentence's IOB2 tags as the caller sees them, with earlier
            edits applied. When another session has edited the sentence since,
            the stored tags win and a warning is logged, so no edit is lost.
        note : str, optional
            Free text kept with the edit.
        origin : dict, optional
            The explanation the edit came from; must be JSON-serialisable.
        doc : str, optional
            Document id of the sentence, used by ``edits(doc=...)``.

        Returns
        -------
        Edit
            The saved edit. It is committed when this method returns.
        """
        sentence = _check_location(split, sentence)
        start, end = _check_span(current_tags, start, end)
        label = _normalize_label(label)
        if not isinstance(note, str):
            raise ValueError(f"expected note to be a string, got {note!r}")
        origin_json = _origin_json(origin)
        created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._transaction(write=True) as connection:
            tags = self._stored_tags(connection, split, sentence, current_tags)
            new_tags = relabel_span(list(tags), start, end, label)
            first, last = _changed_range(tags, new_tags, start, end)
            values = (created_at, split, sentence, start, end, first, json.dumps(tags[first:last]),
                      json.dumps(new_tags[first:last]), label, note, origin_json, doc)
            # A new edit starts a new branch of history, so nothing undone can be redone.
            connection.execute("UPDATE edits SET redo_order = NULL WHERE redo_order IS NOT NULL")
            cursor = connection.execute(
                'INSERT INTO edits (created_at, split, sentence, start, "end", range_start, old_tags, '
                "new_tags, label, note, origin, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            row = connection.execute(f"SELECT {_COLUMNS} FROM edits WHERE id = ?", (cursor.lastrowid,)).fetchone()
        edit = _edit_from_row(row)
        logger.info("saved edit %d: %s sentence %d [%d, %d) -> %s", edit.id, split, sentence, start, end, label or "O")
        return edit

    def _stored_tags(self, connection: sqlite3.Connection, split: str, sentence: int, current_tags: Sequence[str]) -> list[str]:
        """Return the sentence's tags from the database: its first-seen tags plus the active edits.

        The first edit of a sentence stores ``current_tags`` as its base tags.
        """
        row = connection.execute(
            "SELECT tags FROM base_tags WHERE split = ? AND sentence = ?", (split, sentence)
        ).fetchone()
        if row is None:
            connection.execute(
                "INSERT INTO base_tags (split, sentence, tags) VALUES (?, ?, ?)",
                (split, sentence, json.dumps(list(current_tags))),
            )
            return list(current_tags)
        base = json.loads(row[0])
        if len(base) != len(current_tags):
            raise EditStoreError(
                f"{self.path}: {split} sentence {sentence} has {len(current_tags)} tags, but its earlier "
                f"edits were made on {len(base)} tags; the data file changed since, so move edits.sqlite "
                "aside to start a new edit history for it"
            )
        stored = _replay(base, self._select(connection, "split = ? AND sentence = ? AND undone = 0", (split, sentence)))
        if stored != list(current_tags):
            logger.warning(
                "%s sentence %d was changed by another session since the caller read it; "
                "the edit is applied to the stored tags", split, sentence,
            )
        return stored

    def _select(self, connection: sqlite3.Connection, where: str, parameters: tuple = ()) -> list[Edit]:
        rows = connection.execute(f"SELECT {_COLUMNS} FROM edits WHERE {where} ORDER BY id", parameters)
        return [_edit_from_row(row) for row in rows]

    def undo(self) -> Edit | None:
        """Undo the most recent active edit and return it, or ``None`` when there is none."""
        with self._transaction(write=True) as connection:
            row = connection.execute("SELECT max(id) FROM edits WHERE undone = 0").fetchone()
            if row[0] is None:
                return None
            edit = self._mark_undone(connection, row[0])
        logger.info("undid edit %d", edit.id)
        return edit

    def redo(self) -> Edit | None:
        """Redo the most recently undone edit and return it, or ``None`` when there is none.

        Making a new edit empties the redo history.
        """
        with self._transaction(write=True) as connection:
            row = connection.execute(
                "SELECT id FROM edits WHERE redo_order IS NOT NULL ORDER BY redo_order DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            connection.execute("UPDATE edits SET undone = 0, redo_order = NULL WHERE id = ?", (row[0],))
            edit = self._select(connection, "id = ?", (row[0],))[0]
        logger.info("redid edit %d", edit.id)
        return edit

    def undo_edit(self, edit_id: int) -> Edit:
        """Undo one edit, which need not be the most recent one, and return it.

        Like :meth:`undo`, it puts the edit on the redo history, so
        :meth:`redo` restores it until a new edit is made.

        Raises
        ------
        ValueError
            When no edit has this id, or it is already undone.
        EditConflictError
            When a later active edit changed tags of the same tokens. Its new
            tags were computed from this edit's tags, so it must be undone first.
        """
        with self._transaction(write=True) as connection:
            found = self._select(connection, "id = ?", (int(edit_id),))
            if not found:
                raise ValueError(f"expected the id of a saved edit, got {edit_id}")
            edit = found[0]
            if edit.undone:
                raise ValueError(f"expected an active edit, got edit {edit_id}, which is already undone")
            later = self._select(
                connection, "id > ? AND split = ? AND sentence = ? AND undone = 0", (edit.id, edit.split, edit.sentence)
            )
            blocking = [other for other in later if other.overlaps(edit)]
            if blocking:
                ids = ", ".join(str(other.id) for other in blocking)
                raise EditConflictError(
                    f"edit {edit.id} ({edit.split} sentence {edit.sentence}, tokens "
                    f"[{edit.range_start}, {edit.range_end})) cannot be undone alone: later edit(s) {ids} "
                    "changed the same tokens; undo those first"
                )
            edit = self._mark_undone(connection, edit.id)
        logger.info("undid edit %d on request", edit.id)
        return edit

    def _mark_undone(self, connection: sqlite3.Connection, edit_id: int) -> Edit:
        connection.execute(
            "UPDATE edits SET undone = 1, "
            "redo_order = (SELECT coalesce(max(redo_order), 0) + 1 FROM edits) WHERE id = ?",
            (edit_id,),
        )
        return self._select(connection, "id = ?", (edit_id,))[0]

    def edits(
        self,
        *,
        split: str | None = None,
        label: str | None = None,
        doc: str | None = None,
        note_contains: str | None = None,
        include_undone: bool = False,
    ) -> list[Edit]:
        """Return the edits in the order they were made, filtered by the options given.

        ``label`` matches the type the span was set to (``"O"`` matches edits
        that removed an entity), and ``note_contains`` matches notes without
        regard to case.
        """
        conditions = ["1 = 1"]
        parameters: list[Any] = []
        if split is not None:
            conditions.append("split = ?")
            parameters.append(split)
        if label is not None:
            normalized = _normalize_label(label)
            conditions.append("label IS NULL" if normalized is None else "label = ?")
            parameters.extend([] if normalized is None else [normalized])
        if doc is not None:
            conditions.append("doc = ?")
            parameters.append(doc)
        if note_contains is not None:
            conditions.append("instr(lower(note), lower(?)) > 0")
            parameters.append(note_contains)
        if not include_undone:
            conditions.append("undone = 0")
        with self._transaction(write=False) as connection:
            return self._select(connection, " AND ".join(conditions), tuple(parameters))

    def apply(self, split: str, sentences_tags: Sequence[Sequence[str]]) -> list[list[str]]:
        """Return the tags of every sentence of a split with the active edits replayed in order.

        Parameters
        ----------
        split : str
            The split the tags belong to.
        sentences_tags : sequence of sequence of str
            IOB2 tags of each sentence as read from the split's file.

        Raises
        ------
        EditStoreError
            When an edited sentence's tags differ from the tags its first edit
            was made on, which means the data file changed since.
        """
        with self._transaction(write=False) as connection:
            active = self._select(connection, "split = ? AND undone = 0", (split,))
            base_rows = connection.execute(
                "SELECT sentence, tags FROM base_tags WHERE split = ?", (split,)
            ).fetchall()
        result = [list(tags) for tags in sentences_tags]
        edited = {edit.sentence for edit in active}
        for sentence, base_json in base_rows:
            if sentence not in edited:
                continue
            if sentence >= len(result) or result[sentence] != json.loads(base_json):
                raise EditStoreError(
                    f"{self.path}: {split} sentence {sentence} no longer has the tags its edits were made on; "
                    "the data file changed since, so move edits.sqlite aside to start a new edit history for it"
                )
        for edit in active:
            result[edit.sentence][edit.range_start : edit.range_end] = edit.new_tags
        return result

    def changed_sentences(self, split: str) -> list[int]:
        """Return the sorted positions of the sentences of ``split`` that have active edits."""
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                "SELECT DISTINCT sentence FROM edits WHERE split = ? AND undone = 0 ORDER BY sentence", (split,)
            ).fetchall()
        return [row[0] for row in rows]


def _rollback(connection: sqlite3.Connection) -> None:
    if not connection.in_transaction:
        return
    try:
        connection.execute("ROLLBACK")
    except sqlite3.Error as error:
        # SQLite rolls back an open transaction itself when the connection closes.
        logger.warning("rollback failed, closing the connection instead: %s", error)


def _normalize_label(label: str | None) -> str | None:
    if label is None or label == "O":
        return None
    if not isinstance(label, str) or not label or label[:2] in ("B-", "I-", "E-", "S-"):
        raise ValueError(f"expected an entity type such as 'PER', 'O' or None, got {label!r}")
    return label


def _as_position(value: Any, name: str) -> int:
    """Return ``value`` as a Python int; NumPy integers from data frames are accepted too."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer {name}, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"expected an integer {name}, got {value!r}") from None


def _check_location(split: str, sentence: Any) -> int:
    if not isinstance(split, str) or not split:
        raise ValueError(f"expected a split name such as 'train', got {split!r}")
    sentence = _as_position(sentence, "sentence position")
    if sentence < 0:
        raise ValueError(f"expected a sentence position >= 0, got {sentence}")
    return sentence


def _check_span(tags: Sequence[str], start: Any, end: Any) -> tuple[int, int]:
    start, end = _as_position(start, "start"), _as_position(end, "end")
    if not 0 <= start < end <= len(tags):
        raise ValueError(f"expected a span [start, end) with 0 <= start < end <= {len(tags)}, got [{start}, {end})")
    return start, end


def _origin_json(origin: dict[str, Any] | None) -> str | None:
    if origin is None:
        return None
    try:
        return json.dumps(origin, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"expected a JSON-serialisable origin, got {origin!r} ({error})") from None
