"""Helpers shared by the benchmark scripts: corpus paths, machine facts, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SEGFLU_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
RESULTS = REPO_ROOT / "benchmarks" / "results"

CONLL_TRAIN = SHARED_DATA / "conllpp" / "conllpp_train.txt"
CONLL_DEV = SHARED_DATA / "conllpp" / "conllpp_dev.txt"
# The original CoNLL-2003 test set is IOB1; segflu converts it to IOB2 on reading.
CONLL_TEST = SHARED_DATA / "conll2003_original" / "eng.testb"


def require(*paths: Path) -> None:
    """Exit with a message naming the first missing corpus file."""
    for path in paths:
        if not path.exists():
            sys.exit(f"corpus file not found: {path}; set SEGFLU_SHARED_DATA to the folder of the research corpora")


def machine() -> dict:
    """Describe the machine a result was measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, result: dict) -> Path:
    """Write a benchmark result as JSON under benchmarks/results/ and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {**result, "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
