"""segflu: find the training annotations behind a sequence tagger's predictions.

The package contains all logic: CoNLL input and output (:mod:`segflu_core.conll`),
tag schemes (:mod:`segflu_core.schemes`), the linear-chain CRF
(:mod:`segflu_core.crf`), the transformer + CRF tagger
(:mod:`segflu_core.tagger`) and the influence engine behind
:class:`segflu_core.Project`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Project", "__version__"]


def __getattr__(name: str):
    # Importing the project pulls in torch, so it happens on first use only.
    if name == "Project":
        from segflu_core.project import Project

        return Project
    raise AttributeError(f"module 'segflu_core' has no attribute {name!r}")
