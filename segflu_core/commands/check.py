"""``segflu check INPUT``: validate a corpus file and print its statistics.

Prints documents, sentences, tokens, entities per type, the detected tag
scheme, every format error and every invalid tag sequence with file:line.
Exits with 1 when the file has format errors and 0 otherwise; invalid tag
sequences alone do not fail the check, because ``segflu convert --repair``
fixes them.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from segflu_core.conll import FORMATS, PLAIN, Corpus, read_corpus_with_errors
from segflu_core.schemes import tags_to_spans

# Errors and problems printed in text mode before the rest is summarised by count.
MAX_LISTED = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the input file and reading options to ``parser``."""
    parser.add_argument("input", help="CoNLL, JSON Lines or Hugging Face dataset file or folder")
    parser.add_argument("--format", choices=FORMATS, default=None, help="input format (default: from the path)")
    parser.add_argument("--tag-column", type=int, default=-1, help="0-based tag column of CoNLL files (default: last)")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of the file (default: utf-8)")
    parser.add_argument(
        "--scheme", choices=("iob1", "iob2", "bioes", PLAIN), default=None,
        help="tag scheme of the file (default: detected); plain reads labels without B-/I- prefixes",
    )
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def statistics(corpus: Corpus) -> dict:
    """Count documents, sentences, tokens and entities per type of a corpus."""
    entities: Counter[str] = Counter()
    for sentence in corpus.sentences:
        if corpus.scheme == PLAIN:
            entities.update(tag for tag in sentence.tags if tag != "O")
        else:
            entities.update(span.label for span in tags_to_spans(sentence.tags, "iob2"))
    return {
        "documents": len(corpus.documents),
        "sentences": len(corpus.sentences),
        "tokens": sum(len(sentence.tokens) for sentence in corpus.sentences),
        "entities": dict(sorted(entities.items())),
        "scheme": corpus.scheme,
    }


def _report(args: argparse.Namespace) -> dict:
    corpus, errors = read_corpus_with_errors(
        args.input, format=args.format, tag_column=args.tag_column, encoding=args.encoding,
        scheme=args.scheme, split=args.split,
    )
    report = {"file": str(args.input)}
    report.update(statistics(corpus) if corpus is not None else {"scheme": None})
    report["errors"] = [{"line": error.line, "message": str(error)} for error in errors]
    problems = corpus.problems if corpus is not None else []
    report["problems"] = [
        {"line": problem.line, "sentence": problem.sentence, "position": problem.position, "message": str(problem)}
        for problem in problems
    ]
    return report


def _print_text(report: dict) -> None:
    print(f"file: {report['file']}")
    for key in ("documents", "sentences", "tokens"):
        if key in report:
            print(f"{key}: {report[key]}")
    if report.get("entities") is not None:
        listed = ", ".join(f"{label} {count}" for label, count in report["entities"].items()) or "none"
        print(f"entities: {listed}")
    print(f"scheme: {report['scheme']}")
    for key in ("errors", "problems"):
        items = report[key]
        print(f"{key}: {len(items)}")
        for item in items[:MAX_LISTED]:
            print(f"  {item['message']}")
        if len(items) > MAX_LISTED:
            print(f"  ... {len(items) - MAX_LISTED} more (use --json for all)")


def run(args: argparse.Namespace) -> int:
    """Check the file and print the report; return 1 when it has format errors."""
    report = _report(args)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_text(report)
    return 1 if report["errors"] else 0
