"""``segflu export PROJECT OUT``: write a split of a project with its label edits applied."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segflu_core.errors import SegfluError
from segflu_core.export import EXPORT_FORMATS, ExportSummary, export_corrected, load_project_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``segflu export`` to ``parser``."""
    parser.add_argument("project", help="project folder (contains project.json)")
    parser.add_argument("out", help="file to write")
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="output format; spacy writes a DocBin (default: from the suffix .jsonl, .json or .spacy, else the format of the split's file)",
    )
    parser.add_argument("--split", default="train", help="split to export (default: train)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing file, including the imported original or the project's data copy",
    )
    parser.add_argument(
        "--allow-dir",
        action="append",
        default=None,
        metavar="DIR",
        help=(
            "folder the export may be written into, repeatable (default: the current folder, "
            "the project folder and the folder of the imported original)"
        ),
    )


def _allowed_dirs(args: argparse.Namespace) -> list[Path]:
    if args.allow_dir:
        return [Path(folder) for folder in args.allow_dir]
    folders = [Path.cwd(), Path(args.project)]
    entry = load_project_config(args.project)["data"].get(args.split)
    if isinstance(entry, dict) and entry.get("source"):
        folders.append(Path(entry["source"]).parent)
    return folders


def _print_summary(summary: ExportSummary) -> None:
    print(
        f"wrote {summary.path} ({summary.format}): {summary.num_edits} edits, "
        f"{summary.sentences_changed} sentences and {summary.tokens_changed} tokens changed"
    )
    types = sorted(set(summary.entities_before) | set(summary.entities_after))
    if types:
        print(f"{'type':<12}{'before':>10}{'after':>10}")
    for entity_type in types:
        before = summary.entities_before.get(entity_type, 0)
        after = summary.entities_after.get(entity_type, 0)
        print(f"{entity_type:<12}{before:>10}{after:>10}")


def format_from_suffix(path: str) -> str | None:
    """Return the export format an output path's suffix names (.jsonl, .json, .spacy), else ``None``."""
    return {".jsonl": "jsonl", ".json": "jsonl", ".spacy": "spacy"}.get(Path(path).suffix.lower())


def run(args: argparse.Namespace) -> int:
    """Export the corrected split, print what changed and return the exit code."""
    try:
        summary = export_corrected(
            args.project,
            args.out,
            split=args.split,
            format=args.format or format_from_suffix(args.out),
            overwrite=args.overwrite,
            allowed_dirs=_allowed_dirs(args),
        )
    except SegfluError:
        # The command-line entry point prints domain errors.
        raise
    except (ValueError, OSError) as error:
        print(f"segflu export: error: {error}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0
