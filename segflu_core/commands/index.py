"""``segflu index PROJECT``: build the influence index of a trained project.

Writes ``PROJECT/index/`` (see ``docs/index-format.md``) and prints where it
went, how many training words it covers and how long it took.
"""

from __future__ import annotations

import argparse
import time

from segflu_core.influence.index import DEFAULT_CHUNK_SENTENCES, build_index
from segflu_core.project import Project


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the project folder and the build options to ``parser``."""
    parser.add_argument("project", help="project folder written by segflu train")
    parser.add_argument("--refit-head", action="store_true",
                        help="refit the CRF head on the frozen training features (L-BFGS, float64) before indexing")
    parser.add_argument("--hessian", action="store_true",
                        help="also store the Cholesky factor of the head's Hessian for --hessian queries")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of the encoder forward pass (default: auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per encoder batch (default: 32)")
    parser.add_argument("--chunk-sentences", type=int, default=DEFAULT_CHUNK_SENTENCES,
                        help=f"sentences held in memory at once (default: {DEFAULT_CHUNK_SENTENCES})")
    parser.add_argument("--l2", type=float, default=1e-4,
                        help="L2 penalty weight of the head objective for --refit-head and --hessian (default: 1e-4)")
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="--refit-head stops once the largest absolute gradient entry is at most this (default: 1e-6)")


def run(args: argparse.Namespace) -> int:
    """Build the index and print a one-line summary."""
    project = Project.load(args.project, device=args.device)
    started = time.perf_counter()
    folder = build_index(
        project,
        refit_head=args.refit_head,
        hessian=args.hessian,
        batch_size=args.batch_size,
        chunk_sentences=args.chunk_sentences,
        l2=args.l2,
        tolerance=args.tolerance,
    )
    words = project.index.manifest["splits"]["train"]["words"]
    print(f"wrote {folder} ({words} training words) in {time.perf_counter() - started:.1f} s")
    return 0
