"""``segflu convert INPUT OUTPUT``: convert a corpus between tag schemes and formats.

The output keeps the input's format and scheme unless ``--format`` or
``--scheme`` is given, except that an output path ending in ``.jsonl`` or
``.json`` is written as JSON Lines. A CoNLL file written as CoNLL keeps all columns and
lines, and only the tag column changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segflu_core.conll import FORMATS, PLAIN, read_corpus
from segflu_core.schemes import SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add input, output and conversion options to ``parser``."""
    parser.add_argument("input", help="CoNLL, JSON Lines or Hugging Face dataset file or folder")
    parser.add_argument("output", help="file to write (replaced atomically)")
    parser.add_argument("--scheme", choices=SCHEMES, default=None, help="tag scheme to write (default: the input's)")
    parser.add_argument(
        "--format", choices=("conll", "jsonl"), default=None,
        help="output format (default: jsonl for a .jsonl or .json output path, else the input's format; Hugging Face input becomes jsonl)",
    )
    parser.add_argument("--input-format", choices=FORMATS, default=None, help="input format (default: from the path)")
    parser.add_argument(
        "--input-scheme", choices=SCHEMES + (PLAIN,), default=None, help="tag scheme of the input (default: detected)"
    )
    parser.add_argument("--tag-column", type=int, default=-1, help="0-based tag column of CoNLL input (default: last)")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of CoNLL input (default: utf-8)")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    parser.add_argument("--repair", action="store_true", help="repair invalid tag sequences instead of keeping them")


def format_from_suffix(path: str) -> str | None:
    """Return ``"jsonl"`` for a ``.jsonl`` or ``.json`` output path, else ``None`` (keep the input's format)."""
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".json") else None


def run(args: argparse.Namespace) -> int:
    """Read the input, write it in the requested scheme and format, and report invalid sequences."""
    corpus = read_corpus(
        args.input, format=args.input_format, tag_column=args.tag_column, encoding=args.encoding,
        scheme=args.input_scheme, repair=args.repair, split=args.split,
    )
    output_format = args.format or format_from_suffix(args.output) or ("jsonl" if corpus.format == "hf" else corpus.format)
    corpus.write(args.output, format=output_format, scheme=args.scheme)
    target = args.scheme or corpus.scheme
    print(f"wrote {len(corpus.sentences)} sentences to {args.output} ({output_format}, {target})")
    if corpus.problems:
        action = "repaired" if args.repair else "converted as read; pass --repair to fix them"
        print(f"{len(corpus.problems)} invalid tag sequence(s) {action}:", file=sys.stderr)
        for problem in corpus.problems[:20]:
            print(f"  {problem}", file=sys.stderr)
    return 0
