"""Generated corpora and a tiny random encoder for tests.

Nothing here downloads anything: the encoder is a randomly initialised BERT
with a word-level vocabulary written to a temporary folder, and the corpora are
drawn from fixed word lists with a seeded random generator.
"""

from __future__ import annotations

import random
from pathlib import Path

PERSONS = ["john", "mary", "smith", "jones", "alice", "bob", "carol", "dave"]
CITIES = ["paris", "london", "berlin", "madrid", "rome", "vienna", "oslo", "lisbon"]
COMPANIES = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay"]
FILLER = ["the", "a", "said", "went", "to", "on", "monday", "with", "and", "visited", "met", "yesterday"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    """Return every word the generator can produce, lowercased, plus punctuation."""
    words = PERSONS + CITIES + COMPANIES + FILLER + ["in", "at", "works", "for", "special", ".", ","]
    return sorted(set(words))


def make_sentence(rng: random.Random, *, capitalize: bool = True) -> tuple[list[str], list[str]]:
    """Draw one sentence with PER, LOC and ORG entities and its IOB2 tags."""
    tokens: list[str] = []
    tags: list[str] = []

    def add(words: list[str], label: str) -> None:
        for i, word in enumerate(words):
            tokens.append(word.capitalize() if capitalize and label != "O" else word)
            tags.append("O" if label == "O" else ("B-" if i == 0 else "I-") + label)

    person = rng.sample(PERSONS, rng.choice([1, 2]))
    add(person, "PER")
    add([rng.choice(["went", "said", "visited"])], "O")
    if rng.random() < 0.7:
        add(["in"], "O")
        add([rng.choice(CITIES)], "LOC")
    if rng.random() < 0.6:
        add(["works", "for"], "O")
        add([rng.choice(COMPANIES)], "ORG")
    add(rng.sample(FILLER, 2), "O")
    add(["."], "O")
    return tokens, tags


def make_corpus(num_sentences: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Return ``num_sentences`` generated ``(tokens, tags)`` pairs."""
    rng = random.Random(seed)
    return [make_sentence(rng) for _ in range(num_sentences)]


def write_conll(path: Path, sentences: list[tuple[list[str], list[str]]], *, docstart_every: int = 0) -> Path:
    """Write sentences as a two-column, tab-separated CoNLL file."""
    lines: list[str] = []
    for i, (tokens, tags) in enumerate(sentences):
        if docstart_every and i % docstart_every == 0:
            lines.extend(["-DOCSTART-\tO", ""])
        lines.extend(f"{token}\t{tag}" for token, tag in zip(tokens, tags))
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_tiny_encoder(folder: Path, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised one-layer BERT and its uncased tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(SPECIAL_TOKENS + vocabulary()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tokenizer.model_max_length = 64
    config = BertConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(vocabulary()),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
