"""Exact Hessian of the head objective and solves with its Cholesky factor.

Emissions are linear in ``(W, b)``, and the gold score is linear in ``θ``, so
the Hessian of one sentence's loss is ``Jᵀ K J``: ``K`` is the Hessian of
log_partition with respect to ``(emissions, A, π, ω)`` and ``J`` maps ``θ`` to
those inputs. ``K`` is the covariance of the sufficient statistics, built in
closed form from the posterior Markov chain of batches of equal-length
sentences. Contracting ``K`` with the features needs only two matrix
products per batch, because ``∂s_t[c]/∂W[c, :] = h_t`` and
``∂s_t[c]/∂b[c] = 1``: appending a constant 1 to ``h_t`` treats ``b`` as one
more column of ``W``.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from segflu_core.influence.head import HeadParams, check_sentences, parameter_count

logger = logging.getLogger(__name__)


def _posterior_chain(emissions: torch.Tensor, transitions, start, end):
    """Marginals and posterior transition matrices of equal-length sentences.

    The CRF's distribution over tag sequences is a Markov chain with
    ``p(y_0) = μ_0`` and ``p(y_{t+1} = j | y_t = i) = M_t[i, j]``.

    Returns
    -------
    tuple of torch.Tensor
        ``μ`` ``(B, n, C)`` and ``M`` ``(B, n − 1, C, C)``.
    """
    batch, length, num_tags = emissions.shape
    alphas = [start + emissions[:, 0]]
    for t in range(1, length):
        alphas.append(torch.logsumexp(alphas[-1][:, :, None] + transitions, dim=1) + emissions[:, t])
    betas = [end.expand(batch, num_tags)]
    for t in range(length - 2, -1, -1):
        betas.append(torch.logsumexp(transitions + (emissions[:, t + 1] + betas[-1])[:, None, :], dim=2))
    # shape: (B, n, C)
    alpha = torch.stack(alphas, dim=1)
    beta = torch.stack(betas[::-1], dim=1)
    log_partition = torch.logsumexp(alpha[:, -1] + end, dim=1)
    marginals = torch.exp(alpha + beta - log_partition[:, None, None])
    # shape: (B, n − 1, C, C); M_t[i, j] = exp(A[i, j] + s_{t+1}[j] + β_{t+1}[j] − β_t[i]), no division by μ
    chain = torch.exp(transitions + (emissions[:, 1:] + beta[:, 1:])[:, :, None, :] - beta[:, :-1, :, None])
    return marginals, chain


def _forward_products(chain: torch.Tensor, length: int) -> torch.Tensor:
    """Return ``F[t, u] = M_t ⋯ M_{u−1} = p(y_u | y_t)`` for ``u ≥ t`` and zero below, shape ``(B, n, n, C, C)``."""
    batch, num_tags = chain.shape[0], chain.shape[-1]
    products = torch.zeros(batch, length, length, num_tags, num_tags, dtype=chain.dtype)
    rows = torch.arange(length)
    current = torch.eye(num_tags, dtype=chain.dtype).expand(batch, length, num_tags, num_tags)
    products[:, rows, rows] = current
    for offset in range(1, length):
        # F[t, t + k] = F[t, t + k − 1] · M_{t + k − 1}
        current = current[:, :-1] @ chain[:, offset - 1 :]
        products[:, rows[:-offset], rows[offset:]] = current
    return products


def _inner_hessians(params: HeadParams, features: torch.Tensor) -> torch.Tensor:
    """Hessians of log_partition wrt ``(emissions, A, π, ω)`` for equal-length sentences.

    Each Hessian is the covariance of the sufficient statistics: the one-hot
    tag of every word, the tag pair counts, and the first and last tags.
    Pair probabilities come from products of the posterior chain.
    ``features`` has shape ``(B, n, d)``; the result has shape ``(B, m, m)``
    with ``m = n·C + C² + 2C``.
    """
    weight, bias, transitions, start, end = params.to_torch()
    batch, length, _ = features.shape
    num_tags = params.num_tags
    marginals, chain = _posterior_chain(features @ weight.T + bias, transitions, start, end)
    forward = _forward_products(chain, length)
    # shape: (B, n − 1, C, C) pairwise marginals ξ_t[i, j] = μ_t[i] M_t[i, j]
    pairwise = marginals[:, :-1, :, None] * chain
    pair_totals = pairwise.sum(dim=1)

    # shape: (B, n, n, C, C); p(y_t = a, y_u = b) for t < u, zero elsewhere
    strict = forward.clone()
    strict[:, torch.arange(length), torch.arange(length)] = 0.0
    upper = marginals[:, :, None, :, None] * strict
    node_joint = upper + upper.permute(0, 2, 1, 4, 3)
    words = torch.arange(length)
    node_joint[:, words, words] = torch.diag_embed(marginals)
    node_node = node_joint - marginals[:, :, None, :, None] * marginals[:, None, :, None, :]

    # shape: (B, n, C, C, C); Σ_e p(y_t = a, y_e = i, y_{e+1} = j), split into edges e ≥ t and e < t
    after = marginals[..., None, None] * torch.einsum("btuai,buij->btaij", forward[:, :, :-1], chain)
    before = torch.einsum("beij,betja->btaij", pairwise, forward[:, 1:])
    node_pair = after + before - marginals[..., None, None] * pair_totals[:, None, None]

    # shape: (B, C, C, C, C); Σ_{e<f} p(pair_e = (i, j), pair_f = (k, l))
    reach = torch.einsum("beij,befjk->bfijk", pairwise, forward[:, 1:, :-1])
    ordered = torch.einsum("bfijk,bfkl->bijkl", reach, chain)
    pair_pair = ordered + ordered.permute(0, 3, 4, 1, 2) + torch.diag_embed(pair_totals.reshape(batch, -1)).reshape(ordered.shape)
    pair_pair = pair_pair - pair_totals[:, :, :, None, None] * pair_totals[:, None, None]
    return _assemble_inner(node_node, node_pair, pair_pair, length, num_tags)


def _assemble_inner(node_node, node_pair, pair_pair, length: int, num_tags: int) -> torch.Tensor:
    """Lay the covariance blocks out in input order; π and ω repeat the first and last words' tags."""
    batch = node_node.shape[0]
    nodes = length * num_tags
    pairs = num_tags * num_tags
    base = torch.empty(batch, nodes + pairs, nodes + pairs, dtype=node_node.dtype)
    # shape: (B, n, n, C, C) → (B, n, C, n, C)
    base[:, :nodes, :nodes] = node_node.permute(0, 1, 3, 2, 4).reshape(batch, nodes, nodes)
    base[:, :nodes, nodes:] = node_pair.reshape(batch, nodes, pairs)
    base[:, nodes:, :nodes] = node_pair.reshape(batch, nodes, pairs).transpose(1, 2)
    base[:, nodes:, nodes:] = pair_pair.reshape(batch, pairs, pairs)
    first = torch.arange(num_tags)
    index = torch.cat([torch.arange(nodes + pairs), first, first + (length - 1) * num_tags])
    return base[:, index][:, :, index]


class _HessianAccumulator:
    """Running sums of the three blocks of ``Σ_i ∇² log_partition_i`` in augmented coordinates.

    The augmented emission parameters are ``(c, j)`` for ``j ≤ d``, where
    ``j = d`` is the bias. The other parameters are ``k`` over ``(A, π, ω)``.
    """

    def __init__(self, num_tags: int, dim: int):
        self.num_tags = num_tags
        self.dim = dim
        extra = num_tags * num_tags + 2 * num_tags
        augmented = num_tags * (dim + 1)
        # The emission block is symmetric under swapping (c, j) and (c', l), so
        # only tag pairs c ≤ c' are accumulated, as (d + 1, pairs, d + 1).
        self.first_tags, self.second_tags = (torch.from_numpy(i) for i in np.triu_indices(num_tags))
        self.emission_pairs = torch.zeros(dim + 1, len(self.first_tags), dim + 1, dtype=torch.float64)
        self.cross_block = torch.zeros(augmented, extra, dtype=torch.float64)
        self.extra_block = torch.zeros(extra, extra, dtype=torch.float64)

    def add(self, hessians: torch.Tensor, features: torch.Tensor) -> None:
        """Add the contribution of ``B`` sentences: hessians ``(B, m, m)``, features ``(B, n, d)``."""
        batch, length, dim = features.shape
        num_tags = self.num_tags
        split = length * num_tags
        ones = torch.ones(batch, length, 1, dtype=torch.float64)
        # shape: (B, n, d + 1)
        augmented = torch.cat([features, ones], dim=2)
        # shape: (B·n, d + 1)
        flat = augmented.reshape(batch * length, dim + 1)

        # shape: (B, n, C, n, C) → (pairs, B, n, n) → (B, n, pairs, n): tag pairs c ≤ c', second word last
        emission_hessian = hessians[:, :split, :split].reshape(batch, length, num_tags, length, num_tags)
        emission_hessian = emission_hessian[:, :, self.first_tags, :, self.second_tags].permute(1, 2, 0, 3)
        pair_count = len(self.first_tags)
        # shape: (B·n, pairs·(d + 1)); contracted with the second word's features
        right = torch.bmm(emission_hessian.reshape(batch, length * pair_count, length), augmented)
        right = right.reshape(batch * length, pair_count * (dim + 1))
        # shape: (d + 1, pairs, d + 1)
        self.emission_pairs += (flat.T @ right).reshape(dim + 1, pair_count, dim + 1)

        # shape: (B·n, C·K)
        cross = hessians[:, :split, split:].reshape(batch * length, -1)
        # shape: (d + 1, C, K) → (C, d + 1, K)
        cross_product = (flat.T @ cross).reshape(dim + 1, num_tags, -1).permute(1, 0, 2)
        self.cross_block += cross_product.reshape(self.cross_block.shape)
        self.extra_block += hessians[:, split:, split:].sum(dim=0)

    def assemble(self) -> np.ndarray:
        """Return the sum as a ``(P, P)`` matrix in :meth:`HeadParams.flatten` order."""
        num_tags, dim = self.num_tags, self.dim
        size = parameter_count(num_tags, dim)
        tag, column = np.divmod(np.arange(num_tags * (dim + 1)), dim + 1)
        # position of augmented parameter (c, j) in the flattened head: W[c, j], or b[c] when j = d
        position = np.where(column < dim, tag * dim + column, num_tags * dim + tag)
        extra = np.arange(num_tags * (dim + 1), size)
        # shape: (C, d + 1, C, d + 1); the pair (c, c') fills block [c, :, c', :] and its transpose
        emission_block = torch.empty(num_tags, dim + 1, num_tags, dim + 1, dtype=torch.float64)
        emission_block[self.first_tags, :, self.second_tags, :] = self.emission_pairs.permute(1, 0, 2)
        emission_block[self.second_tags, :, self.first_tags, :] = self.emission_pairs.permute(1, 2, 0)
        augmented = num_tags * (dim + 1)
        hessian = np.empty((size, size))
        hessian[np.ix_(position, position)] = emission_block.reshape(augmented, augmented).numpy()
        hessian[np.ix_(position, extra)] = self.cross_block.numpy()
        hessian[np.ix_(extra, position)] = self.cross_block.numpy().T
        hessian[np.ix_(extra, extra)] = self.extra_block.numpy()
        return hessian


def head_hessian(
    params: HeadParams,
    features,
    labels,
    *,
    l2: float,
    max_batch_tokens: int = 1024,
    progress: bool = False,
) -> np.ndarray:
    """Compute the exact Hessian ``∇²J`` of the head objective.

    ``J(θ) = (1/N) Σ_i L_i(θ) + (λ/2)‖θ‖²``, so ``∇²J`` is the mean over
    sentences of the covariance of the sufficient statistics plus ``λ·I``.
    It is symmetric positive semidefinite, and positive definite for ``λ > 0``.
    It does not depend on the labels, which are only validated.

    Parameters
    ----------
    params : HeadParams
        The point ``θ``, usually a minimum of ``J``.
    features, labels : sequences of np.ndarray
        Training sentences, shapes ``(n_i, d)`` and ``(n_i,)``.
    l2 : float
        Weight ``λ`` of the ``(λ/2)‖θ‖²`` penalty.
    max_batch_tokens : int
        Words per batch of equal-length sentences. Peak memory is about
        ``max_batch_tokens · C² · (d + 1) · 8`` bytes plus ``8·P²`` for the result.
    progress : bool
        Show a tqdm progress bar over batches.

    Returns
    -------
    np.ndarray
        ``(P, P)`` float64 in :meth:`HeadParams.flatten` order.
    """
    lengths = check_sentences(features, labels, params.num_tags)
    if np.shape(features[0])[1] != params.dim:
        raise ValueError(f"expected features with d={params.dim}, got shape {np.shape(features[0])}")
    if max_batch_tokens < 1:
        raise ValueError(f"expected max_batch_tokens >= 1, got {max_batch_tokens}")
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[int(length)].append(index)
    batches = []
    for length, indices in sorted(by_length.items()):
        size = max(1, max_batch_tokens // length)
        batches.extend(indices[i : i + size] for i in range(0, len(indices), size))

    accumulator = _HessianAccumulator(params.num_tags, params.dim)
    for batch in tqdm(batches, desc="Hessian", disable=not progress):
        # shape: (B, n, d)
        stacked = torch.from_numpy(np.stack([np.asarray(features[i], dtype=np.float64) for i in batch]))
        accumulator.add(_inner_hessians(params, stacked), stacked)
    hessian = accumulator.assemble() / len(lengths)
    hessian[np.diag_indices_from(hessian)] += l2
    logger.info("Hessian of %d parameters from %d sentences in %d batches", hessian.shape[0], len(lengths), len(batches))
    return hessian


def factor_hessian(hessian: np.ndarray, *, damping: float = 0.0) -> np.ndarray:
    """Return the lower Cholesky factor of ``hessian + damping·I``, shape ``(P, P)``.

    Raises
    ------
    ValueError
        If the matrix is not square or not positive definite; a larger
        ``damping`` (or ``l2``) fixes the latter.
    """
    hessian = np.asarray(hessian, dtype=np.float64)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"expected a square Hessian, got shape {hessian.shape}")
    if damping < 0:
        raise ValueError(f"expected damping >= 0, got {damping}")
    shifted = hessian + damping * np.eye(hessian.shape[0])
    try:
        return scipy.linalg.cholesky(shifted, lower=True)
    except np.linalg.LinAlgError as error:
        raise ValueError(f"expected a positive definite Hessian, got a failed Cholesky factorisation with damping={damping}; increase damping or l2") from error


def solve(factor: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Return ``H⁻¹ v`` from the lower Cholesky factor of ``H`` by two triangular solves.

    ``vector`` has shape ``(P,)`` or ``(P, k)``; the result has the same shape.
    """
    factor = np.asarray(factor, dtype=np.float64)
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape[0] != factor.shape[0]:
        raise ValueError(f"expected a vector with {factor.shape[0]} rows, got shape {vector.shape}")
    return scipy.linalg.cho_solve((factor, True), vector)


def solve_params(factor: np.ndarray, gradient: HeadParams) -> HeadParams:
    """Return ``H⁻¹ g`` as head parameters, for use as an influence query."""
    solution = solve(factor, gradient.flatten())
    return HeadParams.unflatten(solution, gradient.num_tags, gradient.dim)
