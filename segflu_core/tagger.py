"""The sequence tagger: word encoder, dropout, linear emissions and a CRF.

A :class:`Tagger` is saved as a folder of JSON and safetensors files::

    config.json        encoder, whether it was fine-tuned, feature settings, dropout
    labels.json        the IOB2 tags, in emission order
    head.safetensors   emission weight and bias, CRF transitions, start and end scores
    encoder/           fine-tuned encoders only: weights (safetensors) and tokenizer

Loading never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segflu_core.conll import atomic_write_bytes
from segflu_core.crf import CRF
from segflu_core.encoder import DEFAULT_ENCODER, WordEncoder
from segflu_core.errors import ProjectError
from segflu_core.schemes import allowed_transitions

logger = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
HEAD_TENSORS = ("emission.weight", "emission.bias", "crf.transitions", "crf.start_transitions", "crf.end_transitions")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for ``"auto"``, ``"cpu"`` or ``"cuda"``; ``"auto"`` picks CUDA when present.

    Raises
    ------
    ValueError
        For another name, or for ``"cuda"`` on a machine without CUDA.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"expected a device that is available, got {device!r} but CUDA is not; use --device cpu")
        return torch.device(device)
    raise ValueError(f"expected device 'auto', 'cpu' or 'cuda', got {device!r}")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically (temporary file, fsync, ``os.replace``)."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def sorted_batches(token_lists: Sequence[Sequence[str]], batch_size: int) -> list[list[int]]:
    """Group sentence indices into batches of similar length, longest first, to reduce padding."""
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    order = sorted(range(len(token_lists)), key=lambda index: -len(token_lists[index]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_features(features: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sentence word features into a zero-padded batch.

    Parameters
    ----------
    features : sequence of array
        float ``(n_words, feature_dim)`` per sentence.

    Returns
    -------
    (padded, mask)
        float32 ``(batch, max_words, feature_dim)`` and bool ``(batch, max_words)``.
    """
    tensors = [torch.as_tensor(array, dtype=torch.float32) for array in features]
    lengths = torch.tensor([tensor.shape[0] for tensor in tensors], dtype=torch.long)
    # shape: (batch, max_words, feature_dim)
    padded = nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    # shape: (batch, max_words)
    mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


class Tagger(nn.Module):
    """Word encoder, dropout, linear emissions (``emission``) and a linear-chain CRF (``crf``).

    Parameters
    ----------
    encoder : WordEncoder
        Produces word features ``(batch, max_words, feature_dim)``.
    labels : sequence of str
        The ``C`` IOB2 tags, ``"O"`` first, as from :func:`segflu_core.schemes.label_list`.
    dropout : float
        Dropout probability on the word features before the emission layer.
    fine_tune_encoder : bool
        Whether the encoder is trained with the head. A frozen encoder runs
        without gradients and is not saved with the model.
    """

    def __init__(
        self,
        encoder: WordEncoder,
        labels: Sequence[str],
        *,
        dropout: float = 0.1,
        fine_tune_encoder: bool = True,
    ):
        super().__init__()
        labels = list(labels)
        if not labels or labels[0] != "O" or len(set(labels)) != len(labels):
            raise ValueError(f"expected distinct labels with 'O' first, got {labels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        self.encoder = encoder
        self.labels = labels
        self.fine_tune_encoder = bool(fine_tune_encoder)
        # The encoder the tagger was built on: the default's name, an absolute
        # folder or a Hugging Face id. A loaded fine-tuned tagger keeps the
        # origin of its training, though its weights come from ``encoder/``.
        self.encoder_origin = DEFAULT_ENCODER if encoder.name == DEFAULT_ENCODER else encoder.location
        self.dropout = nn.Dropout(dropout)
        self.emission = nn.Linear(encoder.feature_dim, len(labels))
        self.crf = CRF(len(labels))
        start, pairs, end = allowed_transitions(labels, "iob2")
        self.register_buffer("allowed_start", torch.from_numpy(start), persistent=False)
        self.register_buffer("allowed", torch.from_numpy(pairs), persistent=False)
        self.register_buffer("allowed_end", torch.from_numpy(end), persistent=False)
        # Word features by sentence, kept only for a frozen encoder (see enable_feature_cache).
        self._feature_cache: dict[tuple[str, ...], np.ndarray] | None = None

    @classmethod
    def create(
        cls,
        labels: Sequence[str],
        *,
        encoder: str | os.PathLike | None = None,
        dropout: float = 0.1,
        fine_tune_encoder: bool = True,
        case_embeddings: bool | None = False,
        device: str | torch.device = "cpu",
    ) -> "Tagger":
        """Build an untrained tagger on ``encoder`` (a folder, a Hugging Face id or ``None`` for the default).

        ``case_embeddings`` is passed to :class:`WordEncoder`; ``None`` decides from the encoder.
        """
        word_encoder = WordEncoder(encoder, case_embeddings=case_embeddings)
        tagger = cls(word_encoder, labels, dropout=dropout, fine_tune_encoder=fine_tune_encoder)
        return tagger.to(resolve_device(device))

    @property
    def device(self) -> torch.device:
        """Device of the emission layer."""
        return self.emission.weight.device

    def forward_features(self, token_lists: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode sentences; returns float32 features ``(batch, max_words, feature_dim)`` and a bool mask."""
        if self.fine_tune_encoder:
            return self.encoder(token_lists)
        with torch.no_grad():
            return self.encoder(token_lists)

    def emissions(self, features: torch.Tensor) -> torch.Tensor:
        """Score every tag for every word: ``(batch, seq_len, feature_dim)`` to ``(batch, seq_len, C)``."""
        return self.emission(self.dropout(features))

    def loss_from_features(self, features: torch.Tensor, tag_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the mean negative log-likelihood of ``tag_ids`` ``(batch, seq_len)`` given word features."""
        features = features.to(self.device)
        return -self.crf(self.emissions(features), tag_ids.to(self.device), mask.to(self.device), reduction="mean")

    def loss(self, token_lists: Sequence[Sequence[str]], tag_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the mean negative log-likelihood of the gold tags, a scalar.

        Parameters
        ----------
        token_lists : sequence of sequence of str
            Non-empty sentences.
        tag_ids : torch.Tensor
            long ``(batch, max_words)``, indices into :attr:`labels`, any value past each sentence.
        mask : torch.Tensor
            bool ``(batch, max_words)``.
        """
        features, feature_mask = self.forward_features(token_lists)
        if tuple(feature_mask.shape) != tuple(mask.shape):
            raise ValueError(f"expected a mask of shape {tuple(feature_mask.shape)}, got {tuple(mask.shape)}")
        return self.loss_from_features(features, tag_ids, mask)

    def decode_features(self, features: torch.Tensor, mask: torch.Tensor) -> list[list[str]]:
        """Return the Viterbi tags of each sentence, where no transition invalid in IOB2 occurs.

        ``features`` is float ``(batch, seq_len, feature_dim)`` and ``mask``
        bool ``(batch, seq_len)``; sentences with no word get an empty list.
        """
        mask = mask.to(self.device)
        result: list[list[str]] = [[] for _ in range(mask.shape[0])]
        non_empty = mask[:, 0].nonzero().flatten() if mask.shape[1] else mask.new_zeros(0, dtype=torch.long)
        if len(non_empty) == 0:
            return result
        emissions = self.emissions(features.to(self.device)[non_empty])
        paths = self.crf.decode(
            emissions,
            mask[non_empty],
            allowed_start=self.allowed_start,
            allowed=self.allowed,
            allowed_end=self.allowed_end,
        )
        for row, path in zip(non_empty.tolist(), paths):
            result[row] = [self.labels[tag] for tag in path]
        return result

    def enable_feature_cache(self) -> None:
        """Keep the word features of every sentence that :meth:`word_features` or :meth:`predict` receives.

        A frozen encoder gives a sentence the same features every time, so
        training, evaluation and saving the features run the encoder once per
        sentence. The cache holds float32 ``(n_words, feature_dim)`` arrays in
        memory, about 1.6 KB per word at the default encoder.

        Raises
        ------
        ValueError
            For a fine-tuned encoder, whose features change while it trains.
        """
        if self.fine_tune_encoder:
            raise ValueError("expected a tagger with a frozen encoder for the feature cache, got fine_tune_encoder=True")
        if self._feature_cache is None:
            self._feature_cache = {}

    def predict(self, token_lists: Sequence[Sequence[str]], *, batch_size: int = 32) -> list[list[str]]:
        """Tag sentences in eval mode; returns one IOB2 tag per word, in input order."""
        if self._feature_cache is not None:
            return self._predict_cached(token_lists, batch_size=batch_size)
        result: list[list[str]] = [[] for _ in token_lists]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for batch in sorted_batches(token_lists, batch_size):
                    features, mask = self.encoder([token_lists[index] for index in batch])
                    for index, tags in zip(batch, self.decode_features(features, mask)):
                        result[index] = tags
        finally:
            self.train(was_training)
        return result

    def _predict_cached(self, token_lists: Sequence[Sequence[str]], *, batch_size: int) -> list[list[str]]:
        features = self.word_features(token_lists, batch_size=batch_size, progress=False)
        result: list[list[str]] = []
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for first in range(0, len(features), 256):
                    padded, mask = pad_features(features[first : first + 256])
                    result.extend(self.decode_features(padded.to(self.device), mask))
        finally:
            self.train(was_training)
        return result

    def word_features(
        self, token_lists: Sequence[Sequence[str]], *, batch_size: int = 32, progress: bool = True
    ) -> list[np.ndarray]:
        """Compute the encoder's word features in eval mode without gradients.

        With :meth:`enable_feature_cache`, sentences seen before are taken
        from the cache and only the others go through the encoder.

        Returns
        -------
        list of numpy.ndarray
            float32 ``(n_words, feature_dim)`` per sentence, in input order;
            these are the inputs of the emission layer.
        """
        cache = self._feature_cache
        if cache is None:
            return self._encode_words(token_lists, batch_size=batch_size, progress=progress)
        keys = [tuple(tokens) for tokens in token_lists]
        missing = list(dict.fromkeys(key for key in keys if key not in cache))
        if missing:
            computed = self._encode_words(missing, batch_size=batch_size, progress=progress)
            cache.update(zip(missing, computed))
        return [cache[key] for key in keys]

    def _encode_words(
        self, token_lists: Sequence[Sequence[str]], *, batch_size: int, progress: bool
    ) -> list[np.ndarray]:
        result: list[np.ndarray] = [np.zeros((0, self.encoder.feature_dim), dtype=np.float32) for _ in token_lists]
        was_training = self.training
        self.eval()
        total_words = sum(len(tokens) for tokens in token_lists)
        try:
            with torch.no_grad(), tqdm(total=total_words, unit="word", desc="word features", disable=not progress) as bar:
                for batch in sorted_batches(token_lists, batch_size):
                    features, _ = self.encoder([token_lists[index] for index in batch])
                    features = features.cpu().numpy()
                    for row, index in enumerate(batch):
                        result[index] = np.ascontiguousarray(features[row, : len(token_lists[index])], dtype=np.float32)
                    bar.update(sum(len(token_lists[index]) for index in batch))
        finally:
            self.train(was_training)
        return result

    def config(self) -> dict[str, Any]:
        """Return the settings that :meth:`load` needs to rebuild this tagger."""
        return {
            "format_version": MODEL_FORMAT_VERSION,
            "encoder": self.encoder_origin,
            "encoder_fine_tuned": self.fine_tune_encoder,
            "use_shape_features": self.encoder.use_shape_features,
            "max_window_pieces": self.encoder.max_window_pieces,
            "case_embeddings": self.encoder.case_embeddings,
            "feature_dim": self.encoder.feature_dim,
            "dropout": self.dropout.p,
        }

    def save(self, model_dir: str | os.PathLike) -> None:
        """Write ``config.json``, ``labels.json``, ``head.safetensors`` and, when fine-tuned, ``encoder/``."""
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        head = {name: state[name].detach().cpu().contiguous() for name in HEAD_TENSORS}
        save_file(head, str(model_dir / "head.safetensors"))
        if self.fine_tune_encoder:
            self.encoder.model.save_pretrained(model_dir / "encoder", safe_serialization=True)
            self.encoder.tokenizer.save_pretrained(model_dir / "encoder")
        write_json(model_dir / "labels.json", self.labels)
        write_json(model_dir / "config.json", self.config())
        logger.info("saved tagger with %d labels to %s", len(self.labels), model_dir)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> "Tagger":
        """Rebuild a tagger saved by :meth:`save`, reading safetensors and JSON only.

        Raises
        ------
        ProjectError
            When a file is missing or the tensors do not match the labels.
        """
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        config = _read_json(model_dir / "config.json")
        labels = _read_json(model_dir / "labels.json")
        if config.get("format_version") != MODEL_FORMAT_VERSION:
            raise ProjectError(
                f"{model_dir / 'config.json'}: expected format_version {MODEL_FORMAT_VERSION}, "
                f"got {config.get('format_version')!r}; retrain the model with this version of segflu"
            )
        source = model_dir / "encoder" if config["encoder_fine_tuned"] else config["encoder"]
        encoder = WordEncoder(
            source,
            use_shape_features=config["use_shape_features"],
            max_window_pieces=config["max_window_pieces"],
            # Models saved before case embeddings existed have no such key.
            case_embeddings=config.get("case_embeddings", False),
        )
        tagger = cls(encoder, labels, dropout=config["dropout"], fine_tune_encoder=config["encoder_fine_tuned"])
        tagger.encoder_origin = config["encoder"]
        head_path = model_dir / "head.safetensors"
        if not head_path.is_file():
            raise ProjectError(f"{head_path}: file not found; retrain the model")
        head = load_file(str(head_path))
        missing = [name for name in HEAD_TENSORS if name not in head]
        if missing:
            raise ProjectError(f"{head_path}: missing tensors {', '.join(missing)}; retrain the model")
        try:
            tagger.load_state_dict({name: head[name] for name in HEAD_TENSORS}, strict=False)
        except RuntimeError as error:
            raise ProjectError(f"{head_path}: tensors do not match {len(labels)} labels ({error}); retrain the model") from error
        return tagger.to(resolve_device(device))


def _read_json(path: Path) -> Any:
    """Read a JSON file of a model folder, raising :class:`ProjectError` when it is missing or invalid."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ProjectError(f"{path}: file not found; the model folder is incomplete, retrain the model") from error
    except json.JSONDecodeError as error:
        raise ProjectError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); retrain the model") from error
