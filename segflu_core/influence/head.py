"""The CRF head as a float64 parameter vector: objective, gradient and refitting.

With the encoder fixed, the tagger's head is log-linear in its parameters
``θ = (W, b, A, π, ω)``: emissions ``s_t = W h_t + b`` for word features
``h_t``, transitions ``A`` (``A[i, j]`` scores tag ``i`` followed by tag
``j``), start transitions ``π`` and end transitions ``ω``. This module
evaluates the training objective

    J(θ) = (1/N) Σ_i L_i(θ) + (λ/2) ‖θ‖²,    L_i = log_partition_i − score_i(gold)

over ``N`` sentences, its gradient, and the conditional loss of a segment
``[start, end)`` given the gold tags outside it. The forward algorithm runs
in torch float64 over all sentences at once, sorted by length, so one
evaluation is a few dozen small batched operations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

logger = logging.getLogger(__name__)

# Added to the emissions of tags that a constrained forward pass must not use.
# exp(-1e5) underflows to exactly 0 in float64, so the constrained
# log_partition is exact, and unlike -inf it keeps gradients free of NaN.
FORBIDDEN_SCORE = -1e5

Segment = tuple[int, int, int]
"""A segment of a sentence: ``(sentence, start, end)``, half-open ``[start, end)``."""


@dataclass
class HeadParams:
    """Parameters of the CRF head, float64 numpy arrays.

    Attributes
    ----------
    weight : np.ndarray
        Emission weight ``W``, shape ``(C, d)``.
    bias : np.ndarray
        Emission bias ``b``, shape ``(C,)``.
    transitions : np.ndarray
        ``A``, shape ``(C, C)``; ``A[i, j]`` scores tag ``i`` followed by tag ``j``.
    start : np.ndarray
        Start transitions ``π``, shape ``(C,)``.
    end : np.ndarray
        End transitions ``ω``, shape ``(C,)``.
    """

    weight: np.ndarray
    bias: np.ndarray
    transitions: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64)
        self.transitions = np.asarray(self.transitions, dtype=np.float64)
        self.start = np.asarray(self.start, dtype=np.float64)
        self.end = np.asarray(self.end, dtype=np.float64)
        if self.weight.ndim != 2:
            raise ValueError(f"expected weight of shape (C, d), got shape {self.weight.shape}")
        num_tags = self.weight.shape[0]
        expected = {
            "bias": (num_tags,),
            "transitions": (num_tags, num_tags),
            "start": (num_tags,),
            "end": (num_tags,),
        }
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ValueError(f"expected {name} of shape {shape}, got shape {actual}")

    @property
    def num_tags(self) -> int:
        """Number of tags ``C``."""
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return self.weight.shape[1]

    @property
    def size(self) -> int:
        """Number of parameters ``P = C·d + C + C² + 2C``."""
        return parameter_count(self.num_tags, self.dim)

    def flatten(self) -> np.ndarray:
        """Concatenate W (row-major), b, A (row-major), π and ω into one vector of shape ``(P,)``."""
        parts = [self.weight.ravel(), self.bias, self.transitions.ravel(), self.start, self.end]
        return np.concatenate(parts)

    @classmethod
    def unflatten(cls, vector: np.ndarray, num_tags: int, dim: int) -> "HeadParams":
        """Split a vector of shape ``(P,)`` in :meth:`flatten` order into head parameters."""
        vector = np.asarray(vector, dtype=np.float64)
        expected = parameter_count(num_tags, dim)
        if vector.shape != (expected,):
            raise ValueError(f"expected a vector of shape ({expected},) for C={num_tags}, d={dim}, got shape {vector.shape}")
        sizes = [num_tags * dim, num_tags, num_tags * num_tags, num_tags, num_tags]
        weight, bias, transitions, start, end = np.split(vector, np.cumsum(sizes)[:-1])
        return cls(
            weight.reshape(num_tags, dim).copy(),
            bias.copy(),
            transitions.reshape(num_tags, num_tags).copy(),
            start.copy(),
            end.copy(),
        )

    @classmethod
    def from_tagger(cls, tagger) -> "HeadParams":
        """Copy the head of a tagger with ``emission`` (``torch.nn.Linear``) and ``crf`` modules."""

        def to_numpy(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().cpu().double().numpy().copy()

        crf = tagger.crf
        return cls(
            to_numpy(tagger.emission.weight),
            to_numpy(tagger.emission.bias),
            to_numpy(crf.transitions),
            to_numpy(crf.start_transitions),
            to_numpy(crf.end_transitions),
        )

    def to_tagger(self, tagger) -> None:
        """Write these parameters into a tagger's head, keeping each tensor's dtype and device."""
        targets = [
            (tagger.emission.weight, self.weight),
            (tagger.emission.bias, self.bias),
            (tagger.crf.transitions, self.transitions),
            (tagger.crf.start_transitions, self.start),
            (tagger.crf.end_transitions, self.end),
        ]
        with torch.no_grad():
            for tensor, value in targets:
                if tuple(tensor.shape) != value.shape:
                    raise ValueError(f"expected a tagger tensor of shape {value.shape}, got shape {tuple(tensor.shape)}")
                tensor.copy_(torch.as_tensor(value, dtype=tensor.dtype, device=tensor.device))

    def to_torch(self, *, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
        """Return ``(W, b, A, π, ω)`` as float64 CPU tensors."""
        arrays = (self.weight, self.bias, self.transitions, self.start, self.end)
        return tuple(torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad) for a in arrays)

    @classmethod
    def from_torch(cls, tensors: Sequence[torch.Tensor]) -> "HeadParams":
        """Build head parameters from five tensors in ``(W, b, A, π, ω)`` order."""
        return cls(*(t.detach().double().numpy().copy() for t in tensors))


def parameter_count(num_tags: int, dim: int) -> int:
    """Return ``P = C·d + C + C² + 2C``, the size of the flattened head."""
    return num_tags * dim + num_tags + num_tags * num_tags + 2 * num_tags


class PackedSentences:
    """Sentences stored for repeated batched evaluation of the head.

    Sentences are sorted by length, longest first, so that the sentences
    still running at position ``t`` are a prefix of the batch.

    Parameters
    ----------
    features : sequence of np.ndarray
        ``features[i]`` has shape ``(n_i, d)``, any float dtype; ``n_i ≥ 1``.
    labels : sequence of np.ndarray
        ``labels[i]`` has shape ``(n_i,)``, integer tags in ``[0, num_tags)``.
    num_tags : int
        Number of tags ``C``.
    allowed : sequence of (int, int) or None
        Per sentence, an optional segment ``[start, end)``. Outside it each
        word is pinned to its gold tag, which turns the log_partition into the
        constrained one of the segment's conditional loss.
    """

    def __init__(self, features, labels, num_tags: int, *, allowed: Sequence[tuple[int, int]] | None = None):
        lengths = check_sentences(features, labels, num_tags)
        self.num_sentences = len(lengths)
        self.num_tags = num_tags
        order = np.argsort(-lengths, kind="stable")
        self.order = order
        self.lengths = lengths[order]
        self.dim = int(np.asarray(features[0]).shape[1])

        flat_features = np.concatenate([np.asarray(features[i], dtype=np.float64) for i in order])
        flat_labels = np.concatenate([np.asarray(labels[i], dtype=np.int64) for i in order])
        offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        # shape: (N_tok, d)
        self.features = torch.from_numpy(flat_features)
        self.labels = torch.from_numpy(flat_labels)
        self.starts = torch.from_numpy(offsets)
        self.ends = torch.from_numpy(offsets + self.lengths - 1)

        position = np.arange(int(self.lengths.max()))
        # shape: (N, T) index of each padded position in the flat arrays (0 for padding)
        padded = offsets[:, None] + position[None, :]
        self.padded_index = torch.from_numpy(np.where(position[None, :] < self.lengths[:, None], padded, 0))
        # active[t] = number of sentences with more than t words
        self.active = [int((self.lengths > t).sum()) for t in range(len(position))]
        is_first = np.zeros(len(flat_labels), dtype=bool)
        is_first[offsets] = True
        # flat indices of words that have a previous word in their sentence
        self.follower = torch.from_numpy(np.flatnonzero(~is_first))
        self.sentence_of_token = torch.from_numpy(np.repeat(np.arange(self.num_sentences), self.lengths))
        self.penalty = None if allowed is None else self._build_penalty(flat_labels, offsets, allowed)

    def _build_penalty(self, flat_labels, offsets, allowed) -> torch.Tensor:
        if len(allowed) != self.num_sentences:
            raise ValueError(f"expected one segment per sentence ({self.num_sentences}), got {len(allowed)}")
        # shape: (N_tok, C)
        penalty = np.full((len(flat_labels), self.num_tags), FORBIDDEN_SCORE)
        penalty[np.arange(len(flat_labels)), flat_labels] = 0.0
        for row, sentence in enumerate(self.order):
            start, end = allowed[sentence]
            penalty[offsets[row] + start : offsets[row] + end] = 0.0
        return torch.from_numpy(penalty)


def check_sentences(features, labels, num_tags: int) -> np.ndarray:
    """Validate sentence features and labels and return the lengths, shape ``(N,)`` int64."""
    if len(features) != len(labels):
        raise ValueError(f"expected as many label arrays as feature arrays ({len(features)}), got {len(labels)}")
    if len(features) == 0:
        raise ValueError("expected at least one sentence, got none")
    dim = None
    lengths = np.empty(len(features), dtype=np.int64)
    for i, (x, y) in enumerate(zip(features, labels)):
        x_shape, y_shape = np.shape(x), np.shape(y)
        if len(x_shape) != 2 or x_shape[0] == 0:
            raise ValueError(f"expected features[{i}] of shape (n >= 1, d), got shape {x_shape}")
        if dim is not None and x_shape[1] != dim:
            raise ValueError(f"expected features[{i}] with d={dim}, got shape {x_shape}")
        dim = x_shape[1]
        if y_shape != (x_shape[0],):
            raise ValueError(f"expected labels[{i}] of shape ({x_shape[0]},), got shape {y_shape}")
        y = np.asarray(y)
        if y.min() < 0 or y.max() >= num_tags:
            raise ValueError(f"expected labels[{i}] in [0, {num_tags}), got values from {y.min()} to {y.max()}")
        lengths[i] = x_shape[0]
    return lengths


def sentence_losses(tensors: Sequence[torch.Tensor], packed: PackedSentences) -> torch.Tensor:
    """Return ``log_partition − gold score`` per sentence, shape ``(N,)`` in packed (sorted) order.

    With ``packed.penalty`` set this is the conditional loss of each
    sentence's segment given the gold tags outside it.
    """
    weight, bias, transitions, start, end = tensors
    # shape: (N_tok, C)
    flat_emissions = packed.features @ weight.T + bias
    gold = packed.labels
    token_gold = flat_emissions.gather(1, gold[:, None]).squeeze(1)
    edge_gold = transitions[gold[packed.follower - 1], gold[packed.follower]]
    sentence_of_token = packed.sentence_of_token
    score = torch.zeros(packed.num_sentences, dtype=torch.float64)
    score = score.index_add(0, sentence_of_token, token_gold)
    score = score.index_add(0, sentence_of_token[packed.follower], edge_gold)
    score = score + start[gold[packed.starts]] + end[gold[packed.ends]]

    if packed.penalty is not None:
        flat_emissions = flat_emissions + packed.penalty
    # shape: (N, T, C)
    emissions = flat_emissions[packed.padded_index]
    log_partition = forward_log_partition(emissions, packed.active, transitions, start, end)
    return log_partition - score


def forward_log_partition(emissions, active: Sequence[int], transitions, start, end) -> torch.Tensor:
    """Run the forward algorithm on length-sorted sentences.

    Parameters
    ----------
    emissions : torch.Tensor
        Shape ``(N, T, C)``, float64, sentences sorted longest first.
    active : sequence of int
        ``active[t]`` is the number of sentences longer than ``t``.

    Returns
    -------
    torch.Tensor
        log_partition per sentence, shape ``(N,)``.
    """
    # Unbinding once keeps the backward pass from allocating a full (N, T, C)
    # gradient for every position's slice.
    steps = emissions.unbind(1)
    # shape: (N, C)
    alpha = start + steps[0]
    for t in range(1, len(steps)):
        running = active[t]
        # shape: (running, C, C) previous tag × next tag
        scores = alpha[:running, :, None] + transitions + steps[t][:running, None, :]
        alpha = torch.cat([torch.logsumexp(scores, dim=1), alpha[running:]])
    return torch.logsumexp(alpha + end, dim=1)


def head_objective(params: HeadParams, features, labels, *, l2: float) -> tuple[float, HeadParams]:
    """Evaluate the training objective ``J(θ)`` of the head and its gradient.

    Parameters
    ----------
    params : HeadParams
        The point ``θ``.
    features : sequence of np.ndarray
        ``features[i]`` has shape ``(n_i, d)``.
    labels : sequence of np.ndarray
        ``labels[i]`` has shape ``(n_i,)``, int tags.
    l2 : float
        Weight ``λ`` of the ``(λ/2)‖θ‖²`` penalty.

    Returns
    -------
    tuple of (float, HeadParams)
        ``J(θ)`` and ``∇J(θ)``.
    """
    packed = PackedSentences(features, labels, params.num_tags)
    value, gradient = _objective_and_gradient(params.flatten(), packed, None, l2, params.num_tags, params.dim)
    return value, HeadParams.unflatten(gradient, params.num_tags, params.dim)


def _objective_and_gradient(vector, packed, removed_packed, l2, num_tags, dim) -> tuple[float, np.ndarray]:
    tensors = HeadParams.unflatten(vector, num_tags, dim).to_torch(requires_grad=True)
    objective = sentence_losses(tensors, packed).sum()
    if removed_packed is not None:
        objective = objective - sentence_losses(tensors, removed_packed).sum()
    objective = objective / packed.num_sentences
    objective = objective + 0.5 * l2 * sum((t * t).sum() for t in tensors)
    objective.backward()
    gradient = np.concatenate([t.grad.numpy().ravel() for t in tensors])
    return float(objective.detach()), gradient


def pack_segments(features, labels, num_tags: int, segments: Sequence[Segment]) -> PackedSentences:
    """Pack the sentences of ``segments`` so that :func:`sentence_losses` returns their conditional losses.

    ``segments[k] = (sentence, start, end)`` indexes ``features``/``labels``;
    the result's losses are in packed order, see ``PackedSentences.order``.
    """
    segments = [check_segment(segment, features) for segment in segments]
    if not segments:
        raise ValueError("expected at least one segment, got none")
    return PackedSentences(
        [features[s] for s, _, _ in segments],
        [labels[s] for s, _, _ in segments],
        num_tags,
        allowed=[(a, b) for _, a, b in segments],
    )


def check_segment(segment, features) -> Segment:
    """Validate ``(sentence, start, end)`` against the sentences and return it as ints."""
    if len(segment) != 3:
        raise ValueError(f"expected a segment (sentence, start, end), got {segment!r}")
    sentence, start, end = (int(v) for v in segment)
    if not 0 <= sentence < len(features):
        raise ValueError(f"expected a sentence index in [0, {len(features)}), got {sentence}")
    length = len(features[sentence])
    if not 0 <= start < end <= length:
        raise ValueError(f"expected 0 <= start < end <= {length} in sentence {sentence}, got [{start}, {end})")
    return sentence, start, end


def segment_losses(params: HeadParams, features, labels, segments: Sequence[Segment]) -> np.ndarray:
    """Return the conditional loss of each segment given the gold tags outside it, shape ``(K,)``."""
    packed = pack_segments(features, labels, params.num_tags, segments)
    with torch.no_grad():
        losses = sentence_losses(params.to_torch(), packed).numpy()
    result = np.empty(len(segments))
    result[packed.order] = losses
    return result


def refit_head(
    params: HeadParams,
    features,
    labels,
    *,
    l2: float = 1e-4,
    tolerance: float = 1e-6,
    max_iterations: int = 500,
    removed: Sequence[Segment] | None = None,
    preconditioner: np.ndarray | None = None,
) -> tuple[HeadParams, dict]:
    """Minimise ``J(θ)`` by L-BFGS in float64, starting from ``params``.

    Parameters
    ----------
    params : HeadParams
        Starting point, usually the trained head or a previous minimum.
    features, labels : sequences of np.ndarray
        Training sentences, shapes ``(n_i, d)`` and ``(n_i,)``.
    l2 : float
        Weight ``λ`` of the ``(λ/2)‖θ‖²`` penalty.
    tolerance : float
        Stop once ``max|∇J| ≤ tolerance``.
    max_iterations : int
        Maximum number of L-BFGS iterations.
    removed : sequence of (sentence, start, end) or None
        Segments whose conditional loss ``(1/N)·CL`` is subtracted from ``J``,
        which removes exactly those words from the training objective.
    preconditioner : np.ndarray or None
        Lower Cholesky factor ``L`` of a Hessian near the minimum, shape
        ``(P, P)``. L-BFGS then runs on ``z`` with ``θ = params + L⁻ᵀ z``,
        where ``J`` is close to ``½‖z‖²`` up to a shift, so a warm start needs
        only a few iterations. The stopping rule still uses ``∇θ J``.

    Returns
    -------
    tuple of (HeadParams, dict)
        The minimum and ``info`` with ``iterations``, ``max_abs_gradient``,
        ``converged`` and ``objective``.
    """
    if tolerance <= 0:
        raise ValueError(f"expected tolerance > 0, got {tolerance}")
    packed = PackedSentences(features, labels, params.num_tags)
    removed_packed = None
    if removed:
        removed_packed = pack_segments(features, labels, params.num_tags, removed)

    def evaluate(vector):
        return _objective_and_gradient(vector, packed, removed_packed, l2, params.num_tags, params.dim)

    vector, result = _minimize(evaluate, params.flatten(), tolerance, max_iterations, preconditioner)
    value, gradient = evaluate(vector)
    max_abs_gradient = float(np.abs(gradient).max())
    info = {
        "iterations": int(result.nit),
        "max_abs_gradient": max_abs_gradient,
        "converged": max_abs_gradient <= tolerance,
        "objective": value,
    }
    if not info["converged"]:
        logger.warning("refit_head stopped at max|gradient| %.3g > tolerance %.3g: %s", max_abs_gradient, tolerance, result.message)
    return HeadParams.unflatten(vector, params.num_tags, params.dim), info


def _minimize(evaluate, start: np.ndarray, tolerance: float, max_iterations: int, preconditioner):
    """Run L-BFGS-B from ``start`` until ``max|∇θ J| ≤ tolerance``; return the point and scipy's result."""
    if preconditioner is None:

        def to_theta(z):
            return z

        def to_z_gradient(gradient):
            return gradient

    else:
        if np.shape(preconditioner) != (len(start), len(start)):
            raise ValueError(f"expected a preconditioner of shape ({len(start)}, {len(start)}), got {np.shape(preconditioner)}")

        def to_theta(z):
            return start + scipy.linalg.solve_triangular(preconditioner, z, lower=True, trans="T")

        def to_z_gradient(gradient):
            return scipy.linalg.solve_triangular(preconditioner, gradient, lower=True)

    latest = {"max_abs_gradient": np.inf}

    def evaluate_z(z):
        value, gradient = evaluate(to_theta(z))
        latest["max_abs_gradient"] = float(np.abs(gradient).max())
        return value, to_z_gradient(gradient)

    def stop_when_converged(intermediate_result):
        # L-BFGS-B evaluates the accepted point last, so `latest` belongs to it.
        if latest["max_abs_gradient"] <= tolerance:
            raise StopIteration

    z0 = start if preconditioner is None else np.zeros_like(start)
    _, gradient = evaluate(start)
    if np.abs(gradient).max() <= tolerance:
        # Already converged, and L-BFGS-B would still take one step.
        return start, scipy.optimize.OptimizeResult(x=z0, nit=0, message="start point already converged")
    # The callback enforces the tolerance on ∇θ J; scipy's own tests are disabled.
    options = {"maxiter": max_iterations, "gtol": 0.0, "ftol": 0.0, "maxcor": 20, "maxls": 50}
    result = scipy.optimize.minimize(
        evaluate_z, z0, jac=True, method="L-BFGS-B", options=options, callback=stop_when_converged
    )
    return to_theta(result.x), result
