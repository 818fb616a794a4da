"""``segflu explain PROJECT``: list the training items behind a prediction.

Prints the rows of :meth:`segflu_core.project.Project.explain` as a table, or
with ``--json`` as a JSON array of objects with the same columns and values.
"""

from __future__ import annotations

import argparse
import json

from segflu_core.influence.explain import GRANULARITIES, LABEL_SOURCES, METHODS
from segflu_core.project import Project


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the project, the query segment and the ranking options to ``parser``."""
    parser.add_argument("project", help="project folder with a built index")
    parser.add_argument("--split", default="test", help="split of the query sentence (default: test)")
    parser.add_argument("--sentence", type=int, required=True,
                        help="0-based sentence position in the split's file, -DOCSTART- lines not counted")
    parser.add_argument("--start", type=int, required=True, help="first word of the segment (0-based)")
    parser.add_argument("--end", type=int, required=True, help="word after the segment's last word (half-open end)")
    parser.add_argument("--labels", choices=LABEL_SOURCES, default="gold",
                        help="labels the segment is explained under (default: gold)")
    parser.add_argument("--method", choices=METHODS, default="segment", help="ranking method (default: segment)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="word",
                        help="training items of segment influence (default: word)")
    parser.add_argument("--hessian", action="store_true", help="use the index's Hessian factor (build with --hessian)")
    parser.add_argument("--label-filter", choices=("same", "different"), default=None,
                        help="keep training items whose gold label type is the same as or different from the segment's")
    parser.add_argument("--top-k", type=int, default=20, help="rows per role (default: 20)")
    parser.add_argument("--json", action="store_true", help="print a JSON array of rows instead of a table")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device of the tagger (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Run the query and print its rows."""
    project = Project.load(args.project, device=args.device)
    rows = project.explain(
        args.split, args.sentence, args.start, args.end,
        labels=args.labels, method=args.method, granularity=args.granularity, hessian=args.hessian,
        label_filter=args.label_filter, top_k=args.top_k,
    )
    if args.json:
        print(json.dumps(rows.to_dict(orient="records"), ensure_ascii=False, indent=1))
    else:
        print(rows.to_string(index=False))
    return 0
