"""Annotated corpora: reading CoNLL column files and writing them back byte for byte.

A :class:`Corpus` keeps the decoded lines of a CoNLL file, so writing it back
without edits reproduces the file exactly (separators, extra columns,
``-DOCSTART-`` lines, blank-line runs, CRLF, BOM and the final newline or its
absence). Edited sentences are converted to the file's tag scheme, and only
the tag column of lines whose tag text changed is rewritten. JSON Lines and
Hugging Face datasets are read by :mod:`segflu_core.formats`.

Inside segflu, ``Sentence.tags`` are always IOB2, whatever scheme the file uses,
except when a file is read with ``scheme="plain"``: then the tag column is kept
as plain labels with no span structure.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segflu_core.errors import ConllFormatError, OutputPathError, TagSchemeError
from segflu_core.schemes import (
    SCHEMES,
    convert_tags,
    detect_scheme,
    find_tag_problems,
    repair_tags,
    scheme_table,
    split_tag,
)

logger = logging.getLogger(__name__)

FORMATS = ("conll", "jsonl", "hf")
DOCSTART = "-DOCSTART-"
# Tag column read as plain labels (e.g. EBM-NLP's P/I/O/N), without a tag scheme.
PLAIN = "plain"
READ_SCHEMES = SCHEMES + (PLAIN,)


@dataclass
class Sentence:
    """Tokens of one sentence with their IOB2 tags and where they came from.

    ``doc`` is the 0-based document index within the file, and ``lines`` the
    1-based source line of each token (CoNLL files only).
    """

    tokens: list[str]
    tags: list[str]
    doc: int
    doc_id: str | None = None
    id: str | None = None
    lines: list[int] | None = None


@dataclass(frozen=True)
class SequenceProblem:
    """Invalid tag sequence found while reading, with the repair in the file's scheme."""

    path: str | None
    line: int | None
    sentence: int
    position: int
    message: str
    repair: tuple[str, ...]

    def __str__(self) -> str:
        location = f"{self.path}:{self.line}: " if self.path is not None and self.line is not None else ""
        return (
            f"{location}sentence {self.sentence}, token {self.position}: {self.message}; "
            f"repair: {' '.join(self.repair)}"
        )


@dataclass
class ConllLayout:
    """Decoded lines and column layout of a CoNLL file, kept to write the file back.

    ``pieces`` is the decoded text split at ``"\\n"``, each piece keeping its
    ``"\\r"``, so joining them with ``"\\n"`` restores the text exactly.
    """

    pieces: list[str]
    separator: str
    tag_column: int
    encoding: str
    bom: bool
    raw_tags: list[list[str]]


@dataclass
class Corpus:
    """Sentences of one file, the scheme of its tag column and the problems found while reading."""

    sentences: list[Sentence]
    path: Path | None
    format: str
    scheme: str
    problems: list[SequenceProblem] = field(default_factory=list)
    num_documents: int = 0
    layout: ConllLayout | None = field(default=None, repr=False)
    # IOB2 tags as read without repair; a sentence whose tags still equal these is written back unchanged.
    loaded_tags: list[list[str]] | None = field(default=None, repr=False)

    @property
    def documents(self) -> list[list[int]]:
        """Sentence indices per document, including documents without sentences."""
        count = max([self.num_documents] + [sentence.doc + 1 for sentence in self.sentences])
        documents: list[list[int]] = [[] for _ in range(count)]
        for index, sentence in enumerate(self.sentences):
            documents[sentence.doc].append(index)
        return documents

    def write(
        self,
        path: str | os.PathLike,
        *,
        tags: list[list[str]] | None = None,
        format: str | None = None,
        scheme: str | None = None,
    ) -> None:
        """Write the corpus atomically, with ``tags`` (IOB2, one list per sentence) in place of the current tags.

        Tags are written in the source file's scheme unless ``scheme`` is given,
        and in the source format unless ``format`` is given. A CoNLL source
        written as CoNLL keeps every byte except the tag column of changed lines.
        """
        tags = [list(sentence.tags) for sentence in self.sentences] if tags is None else tags
        _check_tag_lengths(self.sentences, tags)
        target_format = format or self.format
        target_scheme = scheme or self.scheme
        if target_format not in ("conll", "jsonl"):
            raise ValueError(f"expected output format conll or jsonl, got {target_format!r}")
        if target_scheme not in READ_SCHEMES:
            raise ValueError(f"expected a tag scheme in {', '.join(SCHEMES)}, got {target_scheme!r}")
        if (target_scheme == PLAIN) != (self.scheme == PLAIN):
            raise ValueError(f"cannot convert plain labels to or from a tag scheme, got {self.scheme} to {target_scheme}")

        if target_format == "jsonl":
            from segflu_core.formats import write_jsonl

            write_jsonl(path, self.sentences, tags=[encode_tags(t, target_scheme) for t in tags])
        elif self.layout is not None:
            atomic_write_bytes(path, self._edited_conll(tags, target_scheme))
        else:
            atomic_write_bytes(path, conll_bytes(self.sentences, [encode_tags(t, target_scheme) for t in tags]))

    def _edited_conll(self, tags: list[list[str]], target_scheme: str) -> bytes:
        """Return the source file's bytes with the tag column of changed lines rewritten."""
        layout = self.layout
        assert layout is not None and self.loaded_tags is not None
        pieces = list(layout.pieces)
        for index, sentence in enumerate(self.sentences):
            if target_scheme == self.scheme and tags[index] == self.loaded_tags[index]:
                continue
            written = encode_tags(tags[index], target_scheme)
            for position, tag in enumerate(written):
                if tag == layout.raw_tags[index][position]:
                    continue
                line_index = sentence.lines[position] - 1
                pieces[line_index] = _replace_column(pieces[line_index], layout.separator, layout.tag_column, tag)
        text = ("\ufeff" if layout.bom else "") + "\n".join(pieces)
        return text.encode(layout.encoding)


def _check_tag_lengths(sentences: Sequence[Sentence], tags: Sequence[Sequence[str]]) -> None:
    if len(tags) != len(sentences):
        raise ValueError(f"expected tags for {len(sentences)} sentences, got {len(tags)}")
    for index, (sentence, sentence_tags) in enumerate(zip(sentences, tags)):
        if len(sentence_tags) != len(sentence.tokens):
            raise ValueError(
                f"expected {len(sentence.tokens)} tags for sentence {index}, got {len(sentence_tags)}"
            )


def encode_tags(tags: Sequence[str], scheme: str) -> list[str]:
    """Write IOB2 ``tags`` in ``scheme``; IOB2 and plain labels are returned unchanged."""
    if scheme in ("iob2", PLAIN):
        return list(tags)
    return convert_tags(tags, "iob2", scheme)


def _replace_column(piece: str, separator: str, column: int, value: str) -> str:
    carriage_return = piece.endswith("\r")
    fields = (piece[:-1] if carriage_return else piece).split(separator)
    fields[column] = value
    return separator.join(fields) + ("\r" if carriage_return else "")


def conll_bytes(sentences: Sequence[Sentence], tags: Sequence[Sequence[str]]) -> bytes:
    """Format sentences as a two-column UTF-8 CoNLL file, with ``-DOCSTART-`` lines between documents.

    The separator is a space, or a tab when a token contains a space.
    """
    separator = "\t" if any(" " in token for sentence in sentences for token in sentence.tokens) else " "
    if separator == "\t" and any("\t" in token for sentence in sentences for token in sentence.tokens):
        raise ValueError("expected no tab inside tokens when some tokens contain spaces, got a token with a tab")
    with_docstart = len({sentence.doc for sentence in sentences}) > 1
    lines: list[str] = []
    previous_doc = None
    for sentence, sentence_tags in zip(sentences, tags):
        if with_docstart and sentence.doc != previous_doc:
            lines.extend([f"{DOCSTART}{separator}O", ""])
        previous_doc = sentence.doc
        lines.extend(f"{token}{separator}{tag}" for token, tag in zip(sentence.tokens, sentence_tags))
        lines.append("")
    return "".join(line + "\n" for line in lines).encode("utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and ``os.replace``.

    Readers see either the old or the new file, never a partial one. An
    existing file keeps its permission bits.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputPathError(f"{path}: folder {path.parent} not found; create it first or choose another output path")
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ErrorSink:
    """Raise the first format error, or collect every error when ``collect`` is true."""

    def __init__(self, path: str | None, *, collect: bool = False):
        self.path = path
        self.collect = collect
        self.errors: list[ConllFormatError] = []

    def add(self, message: str, line: int | None = None) -> None:
        error = ConllFormatError(message, path=self.path, line=line)
        if not self.collect:
            raise error
        self.errors.append(error)


def _decode(data: bytes, encoding: str, sink: ErrorSink) -> str:
    """Decode file bytes, reporting the line and the first invalid byte of each undecodable line."""
    try:
        return data.decode(encoding)
    except LookupError:
        raise ValueError(f"expected a Python codec name such as utf-8 or cp1252, got encoding {encoding!r}") from None
    except UnicodeDecodeError:
        pass
    pieces = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            pieces.append(raw.decode(encoding))
        except UnicodeDecodeError as error:
            byte = raw[error.start]
            sink.add(
                f"invalid {encoding} byte 0x{byte:02x} at byte {error.start} of the line; "
                f"if the file uses another encoding, pass it, e.g. --encoding cp1252",
                number,
            )
            pieces.append(raw.decode(encoding, errors="replace"))
    return "\n".join(pieces)


def _detect_separator(pieces: Sequence[str]) -> str:
    for piece in pieces:
        if piece.strip(" \t\r"):
            return "\t" if "\t" in piece else " "
    return " "


@dataclass
class _ParsedLines:
    sentences: list[Sentence] = field(default_factory=list)
    num_documents: int = 0
    tag_column: int = -1


def _parse_conll_lines(pieces: Sequence[str], separator: str, tag_column: int, sink: ErrorSink) -> _ParsedLines:
    """Split decoded lines into sentences and documents, reporting malformed lines."""
    parsed = _ParsedLines()
    doc, doc_open = 0, False
    columns: int | None = None
    reference_line = 0
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def flush() -> None:
        nonlocal tokens, tags, lines, doc_open
        if tokens:
            parsed.sentences.append(Sentence(tokens, tags, doc, lines=lines))
            doc_open = True
        tokens, tags, lines = [], [], []

    for number, piece in enumerate(pieces, start=1):
        content = piece[:-1] if piece.endswith("\r") else piece
        if not content.strip(" \t"):
            flush()
            continue
        fields = content.split(separator)
        if fields[0] == DOCSTART:
            flush()
            if doc_open:
                doc += 1
            doc_open = True
            continue
        if columns is None:
            columns, reference_line = len(fields), number
            parsed.tag_column = _check_tag_column(tag_column, columns, number, content, sink)
        if len(fields) != columns:
            sink.add(
                f"expected {columns} columns as on line {reference_line}, got {len(fields)} in {content!r} "
                f"(columns are separated by {'a tab' if separator == chr(9) else 'a single space'})",
                number,
            )
            continue
        token, tag = fields[0], fields[parsed.tag_column]
        if not token:
            sink.add(f"empty token in {content!r}; every token line needs a non-empty first column", number)
            continue
        if not tag:
            sink.add(f"empty tag in {content!r}; write O for tokens outside entities", number)
            continue
        tokens.append(token)
        tags.append(tag)
        lines.append(number)
    flush()
    parsed.num_documents = doc + 1 if (doc_open or parsed.sentences) else 0
    return parsed


def _check_tag_column(tag_column: int, columns: int, number: int, content: str, sink: ErrorSink) -> int:
    """Return the tag column as a non-negative index, raising when it is missing or is the token column."""
    index = tag_column + columns if tag_column < 0 else tag_column
    if columns < 2 or not 0 < index < columns:
        message = (
            f"expected a tag column other than the token column among {columns} columns, got tag column "
            f"{tag_column} for {content!r}; pass --tag-column or check the separator"
        )
        # A wrong tag column makes every line wrong, so this error stops reading even when collecting.
        raise ConllFormatError(message, path=sink.path, line=number)
    return index


def resolve_tags(
    sentences: list[Sentence],
    *,
    scheme: str | None,
    repair: bool,
    sink: ErrorSink,
    token_lines: Sequence[Sequence[int | None]] | None = None,
) -> tuple[str, list[SequenceProblem], list[list[str]], list[list[str]]]:
    """Check raw tags, detect the scheme, collect problems and set each sentence's tags to IOB2.

    Returns
    -------
    scheme : str
        The scheme of the source tags.
    problems : list of SequenceProblem
        Invalid tag sequences, each with its repair in the source scheme.
    raw_tags : list of list of str
        The tags as written in the source.
    loaded_tags : list of list of str
        IOB2 tags read without repair.
    """
    if scheme is not None and scheme not in READ_SCHEMES:
        raise ValueError(f"expected a tag scheme in {', '.join(READ_SCHEMES)}, got {scheme!r}")
    raw_tags = [list(sentence.tags) for sentence in sentences]
    if scheme == PLAIN:
        return PLAIN, [], raw_tags, [list(tags) for tags in raw_tags]

    def line_of(index: int, position: int) -> int | None:
        return None if token_lines is None else token_lines[index][position]

    _check_prefixes(raw_tags, scheme or "bioes", sink, line_of)
    found = scheme or detect_scheme(raw_tags)
    problems: list[SequenceProblem] = []
    loaded_tags = []
    for index, (sentence, tags) in enumerate(zip(sentences, raw_tags)):
        for problem in find_tag_problems(tags, found):
            problems.append(SequenceProblem(
                sink.path, line_of(index, problem.position), index, problem.position, problem.message, problem.repair,
            ))
        loaded = list(tags) if found == "iob2" else convert_tags(tags, found, "iob2")
        loaded_tags.append(loaded)
        sentence.tags = repair_tags(loaded, "iob2") if repair else list(loaded)
    return found, problems, raw_tags, loaded_tags


def _check_prefixes(raw_tags: list[list[str]], scheme: str, sink: ErrorSink, line_of) -> None:
    """Report tags with an unknown prefix; when collecting, replace them by ``O`` to keep reading."""
    allowed = ", ".join(["O"] + [f"{prefix}-TYPE" for prefix in scheme_table(scheme).prefixes])
    for index, tags in enumerate(raw_tags):
        for position, tag in enumerate(tags):
            try:
                split_tag(tag, scheme)
            except TagSchemeError:
                line = line_of(index, position)
                where = "" if line is not None else f"sentence {index}, token {position}: "
                sink.add(
                    f"{where}unknown tag {tag!r}: allowed tags are {allowed}; if this is not the tag column, "
                    f"pass --tag-column, and read labels without B-/I- prefixes with scheme {PLAIN!r}",
                    line,
                )
                tags[position] = "O"


def read_conll(
    path: str | os.PathLike,
    *,
    tag_column: int = -1,
    encoding: str = "utf-8",
    scheme: str | None = None,
    repair: bool = False,
    sink: ErrorSink | None = None,
) -> Corpus:
    """Read a CoNLL column file (space or tab separated, token first, tag in ``tag_column``).

    ``scheme=None`` detects the tag scheme, ``"plain"`` keeps the tag column as
    plain labels. Invalid tag sequences become ``Corpus.problems`` and are
    repaired only when ``repair`` is true.

    Raises
    ------
    ConllFormatError
        On the first undecodable line, wrong column count, empty token or tag,
        or unknown tag prefix, naming file and line (unless ``sink`` collects).
    """
    path = Path(path)
    sink = sink or ErrorSink(str(path))
    data = path.read_bytes()
    text = _decode(data, encoding, sink)
    bom = text.startswith("\ufeff")
    pieces = (text[1:] if bom else text).split("\n")
    separator = _detect_separator(pieces)
    parsed = _parse_conll_lines(pieces, separator, tag_column, sink)
    token_lines = [sentence.lines for sentence in parsed.sentences]
    found, problems, raw_tags, loaded_tags = resolve_tags(
        parsed.sentences, scheme=scheme, repair=repair, sink=sink, token_lines=token_lines
    )
    layout = ConllLayout(pieces, separator, parsed.tag_column, encoding, bom, raw_tags)
    logger.debug("read %d sentences from %s (%s)", len(parsed.sentences), path, found)
    return Corpus(parsed.sentences, path, "conll", found, problems, parsed.num_documents, layout, loaded_tags)


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format from the path: a folder or .csv/.parquet file is ``hf``, .jsonl/.json is ``jsonl``."""
    path = Path(path)
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".csv", ".parquet", ".arrow"):
        return "hf"
    return "conll"


def read_jsonl(path: str | os.PathLike, **options) -> Corpus:
    """Read JSON Lines; see :func:`segflu_core.formats.read_jsonl`."""
    from segflu_core.formats import read_jsonl as read

    return read(path, **options)


def read_hf_dataset(path: str | os.PathLike, *, split: str | None = None, **options) -> Corpus:
    """Read a Hugging Face dataset from disk; see :func:`segflu_core.formats.read_hf_dataset`."""
    from segflu_core.formats import read_hf_dataset as read

    return read(path, split=split, **options)


def write_jsonl(path: str | os.PathLike, sentences: Sequence[Sentence], *, tags=None) -> None:
    """Write sentences as JSON Lines; see :func:`segflu_core.formats.write_jsonl`."""
    from segflu_core.formats import write_jsonl as write

    write(path, sentences, tags=tags)


def read_corpus(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    tag_column: int = -1,
    encoding: str = "utf-8",
    scheme: str | None = None,
    repair: bool = False,
    split: str | None = None,
    sink: ErrorSink | None = None,
) -> Corpus:
    """Read a CoNLL, JSON Lines or Hugging Face corpus; ``format=None`` guesses it from the path.

    See :func:`read_conll` for ``scheme`` and ``repair``. ``split`` picks the
    split of a saved ``DatasetDict``.
    """
    path = Path(path)
    if not path.exists():
        raise ConllFormatError("file not found; check the path", path=str(path))
    format = format or detect_format(path)
    if format == "conll":
        return read_conll(path, tag_column=tag_column, encoding=encoding, scheme=scheme, repair=repair, sink=sink)
    if format == "jsonl":
        return read_jsonl(path, encoding=encoding, scheme=scheme, repair=repair, sink=sink)
    if format == "hf":
        return read_hf_dataset(path, split=split, scheme=scheme, repair=repair, sink=sink)
    raise ValueError(f"expected a format in {', '.join(FORMATS)}, got {format!r}")


def read_corpus_with_errors(path: str | os.PathLike, **options) -> tuple[Corpus | None, list[ConllFormatError]]:
    """Read like :func:`read_corpus` but collect every format error instead of raising the first.

    Lines with errors are skipped, and tags with unknown prefixes read as
    ``O``, so the corpus still gives statistics. The corpus is ``None`` when
    an error stops reading altogether (e.g. a tag column that does not exist).
    """
    sink = ErrorSink(str(path), collect=True)
    try:
        corpus = read_corpus(path, sink=sink, **options)
    except ConllFormatError as error:
        return None, sink.errors + [error]
    return corpus, sink.errors
