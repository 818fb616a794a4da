"""JSON Lines and Hugging Face dataset input and output for corpora.

JSON Lines files hold one object per line with ``tokens`` and ``ner_tags``
(lists of strings) and optional ``id`` and ``doc_id``. Hugging Face datasets
are read from disk only: a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``, or a local .json/.jsonl/.csv/.parquet file.
Nothing is downloaded.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from segflu_core.conll import Corpus, ErrorSink, Sentence, _check_tag_lengths, atomic_write_bytes, resolve_tags
from segflu_core.errors import ConllFormatError


def _parse_jsonl_line(text: str, sink: ErrorSink, number: int) -> dict | None:
    """Parse and check one JSON Lines object, reporting what is wrong with it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        sink.add(f"invalid JSON at column {error.colno}: {error.msg}", number)
        return None
    if not isinstance(record, dict):
        sink.add(f"expected a JSON object with tokens and ner_tags, got {type(record).__name__}", number)
        return None
    for key in ("tokens", "ner_tags"):
        value = record.get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            sink.add(f"expected {key!r} as a list of strings, got {json.dumps(value)[:80]}", number)
            return None
    if len(record["tokens"]) != len(record["ner_tags"]):
        sink.add(
            f"expected as many ner_tags as tokens, got {len(record['ner_tags'])} tags for "
            f"{len(record['tokens'])} tokens",
            number,
        )
        return None
    if "" in record["tokens"]:
        sink.add(f"empty token at position {record['tokens'].index('')}; every token needs text", number)
        return None
    return record


def read_jsonl(
    path: str | os.PathLike,
    *,
    encoding: str = "utf-8",
    scheme: str | None = None,
    repair: bool = False,
    sink: ErrorSink | None = None,
) -> Corpus:
    """Read a JSON Lines corpus; sentences with the same ``doc_id`` form one document.

    Blank lines are skipped. Without ``doc_id`` every sentence is in document 0.

    Raises
    ------
    ConllFormatError
        On the first invalid line, naming file and line (unless ``sink`` collects).
    """
    path = Path(path)
    sink = sink or ErrorSink(str(path))
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as error:
        raise ConllFormatError(
            f"invalid {encoding} byte at file offset {error.start}; JSON Lines files must be UTF-8", path=str(path)
        ) from None
    sentences: list[Sentence] = []
    token_lines: list[list[int]] = []
    documents: dict[str, int] = {}
    for number, line in enumerate(text.lstrip("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_jsonl_line(line, sink, number)
        if record is None:
            continue
        doc_id = record.get("doc_id")
        doc_id = None if doc_id is None else str(doc_id)
        doc = documents.setdefault(doc_id, len(documents)) if doc_id is not None else 0
        sentence_id = record.get("id")
        sentences.append(Sentence(
            list(record["tokens"]), list(record["ner_tags"]), doc, doc_id,
            None if sentence_id is None else str(sentence_id),
        ))
        token_lines.append([number] * len(record["tokens"]))
    found, problems, _, loaded_tags = resolve_tags(
        sentences, scheme=scheme, repair=repair, sink=sink, token_lines=token_lines
    )
    return Corpus(sentences, path, "jsonl", found, problems, max(len(documents), 1 if sentences else 0),
                  loaded_tags=loaded_tags)


def write_jsonl(
    path: str | os.PathLike, sentences: Sequence[Sentence], *, tags: Sequence[Sequence[str]] | None = None
) -> None:
    """Write sentences as JSON Lines atomically, with ``tags`` (any scheme) in place of their tags.

    ``doc_id`` is the sentence's ``doc_id`` or, when it has none and the
    sentences span several documents, the document index as a string.
    """
    tags = [sentence.tags for sentence in sentences] if tags is None else tags
    _check_tag_lengths(sentences, tags)
    several_documents = len({sentence.doc for sentence in sentences}) > 1
    lines = []
    for sentence, sentence_tags in zip(sentences, tags):
        record: dict = {}
        if sentence.id is not None:
            record["id"] = sentence.id
        if sentence.doc_id is not None:
            record["doc_id"] = sentence.doc_id
        elif several_documents:
            record["doc_id"] = str(sentence.doc)
        record["tokens"] = list(sentence.tokens)
        record["ner_tags"] = list(sentence_tags)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def _load_dataset(path: Path, split: str | None):
    """Load a ``datasets.Dataset`` from a saved folder or a local data file."""
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded.keys())
            if split is None and "train" in names:
                split = "train"
            elif split is None and len(names) == 1:
                split = names[0]
            if split not in names:
                raise ConllFormatError(
                    f"expected a split in {', '.join(names)}, got {split!r}; pick one with split=NAME",
                    path=str(path),
                )
            return loaded[split]
        return loaded
    readers = {".json": "from_json", ".jsonl": "from_json", ".csv": "from_csv", ".parquet": "from_parquet"}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ConllFormatError(
            f"expected a saved dataset folder or a {', '.join(readers)} file, got {path.suffix!r}", path=str(path)
        )
    with tempfile.TemporaryDirectory() as cache_dir:
        return getattr(datasets.Dataset, reader)(str(path), cache_dir=cache_dir, keep_in_memory=True)


def _tag_names(dataset) -> list[str] | None:
    """Return the ``ClassLabel`` names behind integer ``ner_tags``, or ``None`` when tags are strings."""
    feature = dataset.features["ner_tags"]
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    return list(names) if names is not None else None


def _as_list(value, column: str, row: int, sink: ErrorSink) -> list | None:
    """Return a list column value; CSV files store lists as their Python or JSON text."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, (list, tuple)):
        sink.add(f"row {row}: expected {column!r} as a list, got {str(value)[:80]!r}")
        return None
    return list(value)


def read_hf_dataset(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    scheme: str | None = None,
    repair: bool = False,
    sink: ErrorSink | None = None,
) -> Corpus:
    """Read a Hugging Face dataset with ``tokens`` and ``ner_tags`` columns from disk.

    ``split`` picks the split of a ``DatasetDict`` (default ``"train"``, or its
    only split). Integer tags are mapped to strings through the ``ClassLabel``
    names of the ``ner_tags`` feature.
    """
    path = Path(path)
    sink = sink or ErrorSink(str(path))
    dataset = _load_dataset(path, split)
    missing = [column for column in ("tokens", "ner_tags") if column not in dataset.column_names]
    if missing:
        raise ConllFormatError(
            f"missing column(s) {', '.join(missing)}; found {', '.join(dataset.column_names)}", path=str(path)
        )
    names = _tag_names(dataset)
    has_ids = "id" in dataset.column_names
    has_doc_ids = "doc_id" in dataset.column_names
    documents: dict[str, int] = {}
    sentences: list[Sentence] = []
    for row, record in enumerate(dataset):
        tokens = _as_list(record["tokens"], "tokens", row, sink)
        tags = _as_list(record["ner_tags"], "ner_tags", row, sink)
        if tokens is None or tags is None:
            continue
        if names is not None:
            tags = [names[tag] if isinstance(tag, int) and 0 <= tag < len(names) else tag for tag in tags]
        if len(tokens) != len(tags) or not all(isinstance(tag, str) for tag in tags):
            sink.add(f"row {row}: expected one string tag per token, got {tags[:10]!r} for {len(tokens)} tokens")
            continue
        doc_id = str(record["doc_id"]) if has_doc_ids and record["doc_id"] is not None else None
        doc = documents.setdefault(doc_id, len(documents)) if doc_id is not None else 0
        sentence_id = str(record["id"]) if has_ids and record["id"] is not None else None
        sentences.append(Sentence([str(token) for token in tokens], tags, doc, doc_id, sentence_id))
    found, problems, _, loaded_tags = resolve_tags(sentences, scheme=scheme, repair=repair, sink=sink)
    num_documents = max(len(documents), 1 if sentences else 0)
    return Corpus(sentences, path, "hf", found, problems, num_documents, loaded_tags=loaded_tags)
