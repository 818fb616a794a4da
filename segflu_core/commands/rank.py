"""``segflu rank PROJECT --method M``: rank training documents by how likely they are misannotated.

Prints the documents of :meth:`segflu_core.project.Project.rank_noise`, most
suspicious first, as a table or with ``--json`` as a JSON array of objects.
"""

from __future__ import annotations

import argparse
import json

from segflu_core.influence.noise import AGGREGATES, METHODS
from segflu_core.project import Project


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the project, the ranking method and its options to ``parser``."""
    parser.add_argument("project", help="project folder with a built index")
    parser.add_argument("--method", choices=METHODS, required=True, help="score of each training word or sentence")
    parser.add_argument("--clean-docs", default=None,
                        help="corrected corpus file of clean validation documents for the influence and nn methods "
                             "(default: the first 10 dev documents)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="max",
                        help="how word or sentence scores combine into a document score (default: max)")
    parser.add_argument("--top", type=int, default=None, help="print only the first TOP documents (default: all)")
    parser.add_argument("--json", action="store_true", help="print a JSON array of documents instead of a table")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="device of the tagger, used only to read --clean-docs (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Rank the documents and print them."""
    project = Project.load(args.project, device=args.device)
    ranking = project.rank_noise(args.method, clean_docs=args.clean_docs, aggregate=args.aggregate)
    if args.top is not None:
        ranking = ranking.head(args.top)
    if args.json:
        print(json.dumps(ranking.to_dict(orient="records"), ensure_ascii=False, indent=1))
    else:
        table = ranking.assign(sentences=[len(s) for s in ranking.sentences])
        print(table.to_string(index=False))
    return 0
