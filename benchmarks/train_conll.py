"""Train the default tagger on CoNLL-2003 and record F1, time per epoch and peak memory.

Train on CoNLL++ train, select the epoch on CoNLL++ dev, and report the
original CoNLL-2003 test set (converted to IOB2 on reading).

    python benchmarks/train_conll.py --mode fine-tuned --epochs 3 --out runs/conll-ft
    python benchmarks/train_conll.py --mode frozen --out runs/conll-frozen
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from common import CONLL_DEV, CONLL_TEST, CONLL_TRAIN, peak_memory_mb, require, write_result

from segflu_core.conll import read_corpus
from segflu_core.training import TrainConfig, train_project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fine-tuned", "frozen"], required=True)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    parser.add_argument("--head-epochs", type=int, default=60, help="head epochs with a frozen encoder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--encoder-lr", type=float, default=5e-5, help="AdamW learning rate of the encoder")
    parser.add_argument("--case-embeddings", action=argparse.BooleanOptionalAction,
                        help="pass word case to the encoder as token type ids (default: on for uncased encoders)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--name", help="result file name (default: train-conll-MODE)")
    parser.add_argument("--out", required=True, help="project folder to create")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    require(CONLL_TRAIN, CONLL_DEV, CONLL_TEST)

    if args.threads:
        torch.set_num_threads(args.threads)
    frozen = args.mode == "frozen"
    config = TrainConfig(
        epochs=args.epochs, head_epochs=args.head_epochs, batch_size=args.batch_size, freeze_encoder=frozen,
        encoder_lr=args.encoder_lr, case_embeddings=args.case_embeddings,
    )
    started = time.perf_counter()
    result = train_project(CONLL_TRAIN, CONLL_DEV, CONLL_TEST, args.out, config=config, overwrite=True)
    total = time.perf_counter() - started

    train_words = sum(len(sentence.tokens) for sentence in read_corpus(CONLL_TRAIN).sentences)
    history = result["history"]
    # Training time of each epoch alone, without the dev evaluation after it.
    epoch_seconds = [round(train_words / record["words_per_s"], 1) for record in history if record.get("words_per_s")]
    record = {
        "mode": args.mode,
        "epochs": args.epochs if not frozen else args.head_epochs,
        "config": config.to_dict(),
        "threads": torch.get_num_threads(),
        "total_seconds": round(total, 1),
        "train_words": train_words,
        "epoch_seconds": epoch_seconds,
        "history": history,
        "test": result["metrics"]["test"]["micro"],
        "dev": result["metrics"]["dev"]["micro"],
        "peak_memory_mb": round(peak_memory_mb()),
    }
    path = write_result(args.name or f"train-conll-{args.mode}", record)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
