"""Command-line entry point: ``segflu COMMAND ...`` and ``python -m segflu_core``.

Each subcommand lives in ``segflu_core.commands.<name>`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so ``segflu check`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from segflu_core.errors import SegfluError

logger = logging.getLogger(__name__)

# name -> (module under segflu_core.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "validate a CoNLL, JSON Lines or dataset file and print its statistics"),
    "convert": ("convert", "convert between tag schemes (IOB1, IOB2, BIOES) and formats"),
    "train": ("train", "train a transformer + CRF tagger into a project folder"),
    "index": ("index", "build the influence index of a trained project"),
    "explain": ("explain", "list the training items that support and oppose a prediction"),
    "rank": ("rank", "rank training documents by how likely they are misannotated"),
    "validate": ("validate", "compare approximate influence with exact retraining"),
    "app": ("app", "open the segflu web app"),
    "export": ("export", "write the corrected training file of a project"),
    "reproduce": ("reproduce", "rerun an experiment of the segment-influence paper"),
}


def _available_commands() -> dict[str, tuple[str, str]]:
    available = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"segflu_core.commands.{module}") is not None:
            available[name] = (module, help_text)
    return available


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per available command."""
    parser = argparse.ArgumentParser(
        prog="segflu",
        description="Find the training annotations behind a sequence tagger's predictions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available_commands().items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(_module=module)
        if name == "app":
            # Options that segflu does not know, such as --server.port 8502, are
            # handed to Streamlit unchanged (see main).
            subparser.add_argument("project", nargs="?", default=None, help="project folder to open (default: the demo project)")
            continue
        importlib.import_module(f"segflu_core.commands.{module}").add_arguments(subparser)
    return parser


def split_app_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``segflu app [PROJECT] [STREAMLIT OPTIONS]`` into segflu's part and Streamlit's part.

    The project folder is the first argument after ``app`` unless it starts
    with ``-``; everything else after ``app`` (except ``-h``) goes to
    Streamlit, so ``segflu app --server.port 8502`` opens the demo project.
    """
    if "app" not in argv:
        return argv, []
    position = argv.index("app")
    if any(not argument.startswith("-") for argument in argv[:position]):
        return argv, []  # "app" is a value of another command, not the command
    head, tail = argv[: position + 1], argv[position + 1 :]
    if tail and not tail[0].startswith("-"):
        head, tail = head + tail[:1], tail[1:]
    if any(argument in ("-h", "--help") for argument in tail):
        return head + ["--help"], []
    return head, tail


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, streamlit_args = split_app_arguments(argv)
    args = parser.parse_args(argv)
    if args.command == "app":
        args.streamlit_args = streamlit_args
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    command = importlib.import_module(f"segflu_core.commands.{args._module}")
    try:
        return int(command.run(args) or 0)
    except (SegfluError, ValueError) as error:
        # Core functions raise ValueError for invalid arguments, such as a
        # sentence index out of range; the message states what was expected.
        logger.debug("command %s failed", args.command, exc_info=True)
        print(f"segflu {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
