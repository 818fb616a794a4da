"""Experiments of Jain et al. (2022), "Influence Functions for Sequence Tagging Models", as commands.

Each experiment is a module with ``NAME`` and ``run(settings) -> dict``;
:func:`run_experiment` runs one by name and returns the content of the
``EXPERIMENT.json`` file it writes.
"""

from __future__ import annotations

import importlib

from segflu_core.reproduce.common import RunSettings, default_data_dir

# experiment name -> module under segflu_core.reproduce
EXPERIMENTS = {
    "validate": "validate",
    "artifact": "artifact",
    "noise-synthetic": "noise",
    "noise-real": "noise",
    "dosage": "dosage",
    "f1": "f1",
}

__all__ = ["EXPERIMENTS", "RunSettings", "default_data_dir", "run_experiment"]


def run_experiment(name: str, settings: RunSettings) -> dict:
    """Run experiment ``name`` with ``settings`` and return the content of its JSON file."""
    if name not in EXPERIMENTS:
        raise ValueError(f"expected an experiment in {', '.join(EXPERIMENTS)}, got {name!r}")
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    module = importlib.import_module(f"segflu_core.reproduce.{EXPERIMENTS[name]}")
    if EXPERIMENTS[name] == "noise":
        return module.run(settings, kind=name.removeprefix("noise-"))
    return module.run(settings)
