"""``segflu reproduce``: rerun an experiment of the segment-influence paper."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Kept in step with segflu_core.reproduce.EXPERIMENTS; listed here so that
# building the parser does not import torch.
EXPERIMENT_NAMES = ("validate", "artifact", "noise-synthetic", "noise-real", "dosage", "f1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``segflu reproduce`` to ``parser``."""
    parser.add_argument("experiment", choices=EXPERIMENT_NAMES, help="experiment to run")
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help="folder of the research corpora (default: $SEGFLU_SHARED_DATA, else ../shared/data beside the repository)",
    )
    parser.add_argument("--out", default="reproduction", metavar="DIR", help="output folder (default: reproduction)")
    parser.add_argument("--quick", action="store_true", help="run on a small slice with few epochs, in seconds")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device (default: auto, CUDA when present)")
    parser.add_argument("--encoder", metavar="ID_OR_PATH", help="encoder folder or Hugging Face id (default: the packaged MiniLM)")
    parser.add_argument("--seed", type=int, default=13, metavar="N", help="seed of sampling and training (default: 13)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--fine-tune-epochs", type=int, metavar="N",
        help="fine-tune the encoder for N epochs instead of training only the head on frozen features "
        "(f1 trains both; its default is 5)",
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the experiment and print the path and headline figures of its JSON file."""
    from segflu_core.reproduce import RunSettings, default_data_dir, run_experiment

    settings = RunSettings(
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        out_dir=Path(args.out),
        quick=args.quick,
        device=args.device,
        encoder=args.encoder,
        seed=args.seed,
        progress=args.progress,
        threads=args.threads,
        fine_tune_epochs=args.fine_tune_epochs,
    )
    result = run_experiment(args.experiment, settings)
    headline = {key: value for key, value in result.items() if key not in ("settings", "machine", "files")}
    print(json.dumps(headline, indent=2))
    print(f"wrote {settings.out_dir / (args.experiment + '.json')} ({result['wall_time_s']:.0f} s)")
    return 0
