"""Batched linear-chain CRF: log-partition, marginals, Viterbi and segment conditionals.

Every kernel is batch-first and works in log space for any floating dtype and
any device. Shapes and the score of a tag sequence ``y`` of length ``n``:

- ``emissions``: ``(batch, seq_len, num_tags)`` float
- ``tags``: ``(batch, seq_len)`` integer
- ``mask``: ``(batch, seq_len)`` bool, a left-aligned prefix of ones whose
  first column is all ones
- ``transitions[i, j]``: score of tag ``i`` followed by tag ``j``
- ``start_transitions``, ``end_transitions``: ``(num_tags,)``

``score(y) = start[y_1] + sum_t emissions[t, y_t] + sum_{t>=2} transitions[y_{t-1}, y_t] + end[y_n]``
and ``log p(y | x) = score(y) - log_partition(x)``.

The forward and backward passes renormalise their log-messages at every step
and keep the normalisers apart, so the messages stay of the size of single
scores. This keeps float32 marginals accurate on long sentences with large
emissions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CRF",
    "SegmentConditional",
    "log_partition",
    "marginals",
    "pairwise_marginals",
    "path_score",
    "segment_conditional",
    "viterbi_decode",
    "word_conditional",
]

REDUCTIONS = ("none", "sum", "mean", "token_mean")


class SegmentConditional(NamedTuple):
    """Conditional distribution of the labels of a segment given the gold labels outside it.

    Attributes
    ----------
    log_likelihood : Tensor
        ``log p(y[a:b] | y outside [a, b), x)``. Its shape is ``(batch,)``
        from :func:`segment_conditional` and ``(batch, seq_len)`` from
        :func:`word_conditional`, which stores zero at masked positions.
    marginals : Tensor
        ``(batch, seq_len, num_tags)`` constrained marginals inside the segment,
        zero outside it.
    residuals : Tensor
        ``(batch, seq_len, num_tags)`` marginals minus the one-hot gold tags
        inside the segment, zero outside it. This is the gradient of the
        conditional negative log-likelihood with respect to the emissions.
    pairwise : Tensor or None
        ``(batch, seq_len - 1, num_tags, num_tags)`` expected transition counts
        ``p(y_t = i, y_{t+1} = j)`` for every edge that touches the segment,
        zero elsewhere. An edge with one fixed endpoint is the outer product of
        a one-hot vector and the constrained marginal. ``None`` from
        :func:`word_conditional`.
    """

    log_likelihood: Tensor
    marginals: Tensor
    residuals: Tensor
    pairwise: Tensor | None


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _check_emissions_rank(emissions: Tensor) -> None:
    if not isinstance(emissions, Tensor):
        raise ValueError(f"expected emissions to be a torch.Tensor, got {type(emissions).__name__}")
    if emissions.dim() != 3:
        raise ValueError(f"expected emissions with 3 dimensions (batch, seq_len, num_tags), got {emissions.dim()}")


def _check_parameters(
    emissions: Tensor, transitions: Tensor, start_transitions: Tensor, end_transitions: Tensor
) -> None:
    _check_emissions_rank(emissions)
    if not emissions.is_floating_point():
        raise ValueError(f"expected floating-point emissions, got dtype {emissions.dtype}")
    batch, seq_len, num_tags = emissions.shape
    if batch < 1 or seq_len < 1 or num_tags < 1:
        raise ValueError(f"expected emissions with non-empty dimensions, got shape {tuple(emissions.shape)}")
    expected = {
        "transitions": (transitions, (num_tags, num_tags)),
        "start_transitions": (start_transitions, (num_tags,)),
        "end_transitions": (end_transitions, (num_tags,)),
    }
    for name, (value, shape) in expected.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"expected {name} of shape {shape} for {num_tags} tags, got {tuple(value.shape)}")
        if value.dtype != emissions.dtype:
            raise ValueError(f"expected {name} of dtype {emissions.dtype} like the emissions, got {value.dtype}")
        if value.device != emissions.device:
            raise ValueError(f"expected {name} on device {emissions.device} like the emissions, got {value.device}")


def _check_mask(mask: Tensor, emissions: Tensor) -> Tensor:
    """Check that ``mask`` matches the emissions and is a left-aligned prefix, and return it as bool."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"expected mask to be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(emissions.shape[:2]):
        raise ValueError(f"expected mask of shape {tuple(emissions.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"expected a bool mask, got dtype {mask.dtype}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("expected a mask of zeros and ones, got other values")
        mask = mask != 0
    mask = mask.to(emissions.device)
    if not bool(mask[:, 0].all()):
        first_empty = int((~mask[:, 0]).nonzero()[0, 0])
        raise ValueError(f"expected the first mask column to be all True, got False in sentence {first_empty}")
    gaps = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)
    if bool(gaps.any()):
        sentence = int(gaps.nonzero()[0, 0])
        raise ValueError(
            f"expected every mask row to be a left-aligned prefix of True, got a gap in sentence {sentence}"
        )
    return mask


def _check_tags(tags: Tensor, emissions: Tensor, mask: Tensor) -> Tensor:
    """Check ``tags`` against the emissions and mask, and return them as long with padding set to tag 0."""
    if not isinstance(tags, Tensor):
        raise ValueError(f"expected tags to be a torch.Tensor, got {type(tags).__name__}")
    if tuple(tags.shape) != tuple(emissions.shape[:2]):
        raise ValueError(f"expected tags of shape {tuple(emissions.shape[:2])}, got {tuple(tags.shape)}")
    if tags.is_floating_point() or tags.is_complex() or tags.dtype == torch.bool:
        raise ValueError(f"expected integer tags, got dtype {tags.dtype}")
    num_tags = emissions.shape[-1]
    tags = tags.to(device=emissions.device, dtype=torch.long)
    real_tags = tags[mask]
    if bool(((real_tags < 0) | (real_tags >= num_tags)).any()):
        bad = int(real_tags[(real_tags < 0) | (real_tags >= num_tags)][0])
        raise ValueError(f"expected tags in [0, {num_tags}) at unmasked positions, got {bad}")
    # Padding positions may hold any value (often -100), so they are set to a
    # valid index before they are used to gather scores.
    return torch.where(mask, tags, torch.zeros_like(tags))


def _validate(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
) -> tuple[Tensor, Tensor]:
    """Check the inputs, and return the emissions with zeros at padding and the mask as bool.

    Zeroing the padding keeps non-finite padding values out of every result
    and gradient.
    """
    _check_parameters(emissions, transitions, start_transitions, end_transitions)
    mask = _check_mask(mask, emissions)
    return torch.where(mask[..., None], emissions, torch.zeros_like(emissions)), mask


# ---------------------------------------------------------------------------
# Forward-backward kernels without validation
#
# ``start`` and ``end`` may have shape (num_tags,) or (batch, num_tags): the
# segment conditionals run the same kernels on sub-chains whose boundary
# scores differ per sentence.
# ---------------------------------------------------------------------------


def _forward(
    emissions: Tensor, mask: Tensor, transitions: Tensor, start: Tensor, end: Tensor
) -> tuple[Tensor, Tensor]:
    """Return normalised forward log-messages ``(batch, seq_len, C)`` and the log-partition ``(batch,)``."""
    seq_len = emissions.shape[1]
    # shape: (batch, C)
    alpha = start + emissions[:, 0]
    log_norm = torch.logsumexp(alpha, dim=-1)
    alpha = alpha - log_norm[:, None]
    alphas = [alpha]
    for t in range(1, seq_len):
        # Sum over the previous tag i of alpha[i] + transitions[i, j].
        # shape: (batch, C)
        candidate = torch.logsumexp(alpha[:, :, None] + transitions, dim=1) + emissions[:, t]
        step_norm = torch.logsumexp(candidate, dim=-1)
        real = mask[:, t]
        alpha = torch.where(real[:, None], candidate - step_norm[:, None], alpha)
        log_norm = log_norm + torch.where(real, step_norm, torch.zeros_like(step_norm))
        alphas.append(alpha)
    log_z = log_norm + torch.logsumexp(alpha + end, dim=-1)
    return torch.stack(alphas, dim=1), log_z


def _backward(emissions: Tensor, mask: Tensor, transitions: Tensor, end: Tensor) -> Tensor:
    """Return normalised backward log-messages, shape ``(batch, seq_len, C)``.

    Each step is shifted by its own constant, which cancels in the marginals.
    Positions past a sentence's end hold ``end`` and must be masked by callers.
    """
    batch, seq_len, num_tags = emissions.shape
    # shape: (batch, C)
    last = (end - torch.logsumexp(end, dim=-1, keepdim=True)).expand(batch, num_tags)
    beta = last
    betas = [beta]
    for t in range(seq_len - 2, -1, -1):
        # Sum over the next tag j of transitions[i, j] + emissions[t + 1, j] + beta[j].
        # shape: (batch, C)
        candidate = torch.logsumexp(transitions + (emissions[:, t + 1] + beta)[:, None, :], dim=2)
        candidate = candidate - torch.logsumexp(candidate, dim=-1, keepdim=True)
        beta = torch.where(mask[:, t + 1, None], candidate, last)
        betas.append(beta)
    betas.reverse()
    return torch.stack(betas, dim=1)


def _node_marginals(alphas: Tensor, betas: Tensor, mask: Tensor) -> Tensor:
    # shape: (batch, seq_len, C)
    node = torch.softmax(alphas + betas, dim=-1)
    return node * mask[..., None].to(node.dtype)


def _edge_marginals(
    emissions: Tensor, mask: Tensor, transitions: Tensor, alphas: Tensor, betas: Tensor
) -> Tensor:
    batch, seq_len, num_tags = emissions.shape
    # Logit of (y_t = i, y_{t+1} = j), up to a constant per edge.
    # shape: (batch, seq_len - 1, C, C)
    logits = alphas[:, :-1, :, None] + transitions + (emissions[:, 1:] + betas[:, 1:])[:, :, None, :]
    flat = torch.softmax(logits.reshape(batch, seq_len - 1, num_tags * num_tags), dim=-1)
    edge = flat.reshape(batch, seq_len - 1, num_tags, num_tags)
    return edge * mask[:, 1:, None, None].to(edge.dtype)


def _path_score(
    emissions: Tensor, tags: Tensor, mask: Tensor, transitions: Tensor, start: Tensor, end: Tensor
) -> Tensor:
    """Return the score of ``tags`` per sentence, shape ``(batch,)``.

    ``tags`` must hold valid tag indices at masked positions too.
    """
    batch = emissions.shape[0]
    weights = mask.to(emissions.dtype)
    batch_index = torch.arange(batch, device=emissions.device)
    # shape: (batch, seq_len)
    emitted = emissions.gather(2, tags[..., None]).squeeze(-1)
    score = (emitted * weights).sum(dim=1)
    # shape: (batch, seq_len - 1)
    moved = transitions[tags[:, :-1], tags[:, 1:]]
    score = score + (moved * weights[:, 1:]).sum(dim=1)
    last_tag = tags[batch_index, mask.sum(dim=1) - 1]
    start_rows = start if start.dim() == 2 else start[None].expand(batch, -1)
    end_rows = end if end.dim() == 2 else end[None].expand(batch, -1)
    return score + start_rows[batch_index, tags[:, 0]] + end_rows[batch_index, last_tag]


def _forward_backward(
    emissions: Tensor, mask: Tensor, transitions: Tensor, start: Tensor, end: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate the inputs and run the forward and backward passes.

    Returns the emissions with zeros at padding, the bool mask, and the
    forward and backward log-messages.
    """
    emissions, mask = _validate(emissions, mask, transitions, start, end)
    alphas, _ = _forward(emissions, mask, transitions, start, end)
    return emissions, mask, alphas, _backward(emissions, mask, transitions, end)


# ---------------------------------------------------------------------------
# Public functional kernels
# ---------------------------------------------------------------------------


def log_partition(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
) -> Tensor:
    """Compute ``log Z(x)``, the log-sum-exp of the scores of all tag sequences.

    Parameters
    ----------
    emissions : Tensor
        ``(batch, seq_len, num_tags)`` float.
    mask : Tensor
        ``(batch, seq_len)`` bool, a left-aligned prefix of ones whose first
        column is all ones. An integer mask of zeros and ones is accepted too.
    transitions : Tensor
        ``(num_tags, num_tags)``, same dtype as ``emissions``.
    start_transitions, end_transitions : Tensor
        ``(num_tags,)``, same dtype as ``emissions``.

    Returns
    -------
    Tensor
        ``(batch,)`` in the dtype of ``emissions``, differentiable.
    """
    emissions, mask = _validate(emissions, mask, transitions, start_transitions, end_transitions)
    return _forward(emissions, mask, transitions, start_transitions, end_transitions)[1]


def path_score(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
) -> Tensor:
    """Compute the unnormalised score of the gold tag sequences.

    ``tags`` is ``(batch, seq_len)`` integer, and its values at masked
    positions are ignored. Returns a ``(batch,)`` tensor in the dtype of ``emissions``.
    See :func:`log_partition` for the other shapes.
    """
    emissions, mask = _validate(emissions, mask, transitions, start_transitions, end_transitions)
    tags = _check_tags(tags, emissions, mask)
    return _path_score(emissions, tags, mask, transitions, start_transitions, end_transitions)


def marginals(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
) -> Tensor:
    """Compute the node marginals ``p(y_t = c | x)`` by forward-backward.

    Returns a ``(batch, seq_len, num_tags)`` tensor in the dtype of
    ``emissions`` whose rows at masked positions are zero and whose other rows
    sum to one. See :func:`log_partition` for the input shapes.
    """
    _, mask, alphas, betas = _forward_backward(emissions, mask, transitions, start_transitions, end_transitions)
    return _node_marginals(alphas, betas, mask)


def pairwise_marginals(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
) -> Tensor:
    """Compute the edge marginals ``p(y_t = i, y_{t+1} = j | x)`` by forward-backward.

    Returns a ``(batch, seq_len - 1, num_tags, num_tags)`` tensor in the dtype
    of ``emissions``. Entry ``[b, t]`` is zero where position ``t + 1`` is
    masked. See :func:`log_partition` for the input shapes.
    """
    emissions, mask, alphas, betas = _forward_backward(
        emissions, mask, transitions, start_transitions, end_transitions
    )
    return _edge_marginals(emissions, mask, transitions, alphas, betas)


# ---------------------------------------------------------------------------
# Viterbi decoding
# ---------------------------------------------------------------------------


def _allowed_scores(scores: Tensor, allowed: Tensor | None, name: str) -> Tensor:
    """Return ``scores`` with ``-inf`` wherever the boolean ``allowed`` is False."""
    if allowed is None:
        return scores
    allowed = torch.as_tensor(allowed, device=scores.device)
    if tuple(allowed.shape) != tuple(scores.shape):
        raise ValueError(f"expected {name} of shape {tuple(scores.shape)}, got {tuple(allowed.shape)}")
    if allowed.dtype != torch.bool:
        raise ValueError(f"expected {name} of dtype torch.bool, got {allowed.dtype}")
    return scores.masked_fill(~allowed, float("-inf"))


def _backtrack(backpointers: list[Tensor], last_tags: Tensor, lengths: Tensor) -> list[list[int]]:
    # Past a sentence's end each backpointer maps a tag to itself, so walking
    # back from the last column reaches the sentence's own last tag unchanged.
    current = last_tags
    columns = [current]
    for pointers in reversed(backpointers):
        current = pointers.gather(1, current[:, None]).squeeze(1)
        columns.append(current)
    columns.reverse()
    # shape: (batch, seq_len)
    paths = torch.stack(columns, dim=1).tolist()
    return [path[:length] for path, length in zip(paths, lengths.tolist())]


def viterbi_decode(
    emissions: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
    *,
    allowed_start: Tensor | None = None,
    allowed: Tensor | None = None,
    allowed_end: Tensor | None = None,
) -> list[list[int]]:
    """Find the highest-scoring tag sequence of every sentence.

    Parameters
    ----------
    emissions, mask, transitions, start_transitions, end_transitions : Tensor
        As in :func:`log_partition`.
    allowed_start : Tensor, optional
        ``(num_tags,)`` bool. False forbids a tag at the first position.
    allowed : Tensor, optional
        ``(num_tags, num_tags)`` bool. False at ``[i, j]`` forbids tag ``i``
        followed by tag ``j``.
    allowed_end : Tensor, optional
        ``(num_tags,)`` bool. False forbids a tag at the last position.

    Returns
    -------
    list of list of int
        One list of tag indices per sentence, as long as the sentence.

    Raises
    ------
    ValueError
        On invalid inputs, or when the masks forbid every tag sequence of a
        sentence.
    """
    emissions, mask = _validate(emissions, mask, transitions, start_transitions, end_transitions)
    with torch.no_grad():
        start = _allowed_scores(start_transitions, allowed_start, "allowed_start")
        moves = _allowed_scores(transitions, allowed, "allowed")
        end = _allowed_scores(end_transitions, allowed_end, "allowed_end")
        num_tags = emissions.shape[-1]
        identity = torch.arange(num_tags, device=emissions.device)[None]
        # shape: (batch, C)
        score = start + emissions[:, 0]
        backpointers = []
        for t in range(1, emissions.shape[1]):
            # Best previous tag i for every current tag j.
            # shape: (batch, C)
            best, previous = (score[:, :, None] + moves).max(dim=1)
            real = mask[:, t, None]
            score = torch.where(real, best + emissions[:, t], score)
            backpointers.append(torch.where(real, previous, identity))
        final_score, last_tags = (score + end).max(dim=-1)
        blocked = torch.isneginf(final_score)
        if bool(blocked.any()):
            sentence = int(blocked.nonzero()[0, 0])
            raise ValueError(
                f"expected at least one tag sequence allowed by allowed_start, allowed and allowed_end, "
                f"got none for sentence {sentence}"
            )
        return _backtrack(backpointers, last_tags, mask.sum(dim=1))


# ---------------------------------------------------------------------------
# Segment conditionals
# ---------------------------------------------------------------------------


def _check_segments(seg_start: Tensor, seg_end: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    batch = lengths.shape[0]
    checked = []
    for name, value in (("seg_start", seg_start), ("seg_end", seg_end)):
        value = torch.as_tensor(value, device=lengths.device)
        if tuple(value.shape) != (batch,):
            raise ValueError(f"expected {name} of shape ({batch},), got {tuple(value.shape)}")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"expected integer {name}, got dtype {value.dtype}")
        checked.append(value.long())
    seg_start, seg_end = checked
    invalid = (seg_start < 0) | (seg_end <= seg_start) | (seg_end > lengths)
    if bool(invalid.any()):
        i = int(invalid.nonzero()[0, 0])
        raise ValueError(
            f"expected 0 <= seg_start < seg_end <= sentence length, got [{int(seg_start[i])}, "
            f"{int(seg_end[i])}) in sentence {i} of length {int(lengths[i])}"
        )
    return seg_start, seg_end


class _SubChain(NamedTuple):
    """The segment of every sentence as a left-aligned chain of its own."""

    emissions: Tensor  # (batch, max_seg_len, C)
    tags: Tensor  # (batch, max_seg_len)
    mask: Tensor  # (batch, max_seg_len)
    positions: Tensor  # (batch, max_seg_len), sentence position of each sub-chain position
    start: Tensor  # (batch, C), score of entering the segment with each tag
    end: Tensor  # (batch, C), score of leaving the segment from each tag


def _sub_chain(
    emissions: Tensor,
    tags: Tensor,
    lengths: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
    seg_start: Tensor,
    seg_end: Tensor,
) -> _SubChain:
    batch, seq_len, num_tags = emissions.shape
    seg_len = seg_end - seg_start
    offsets = torch.arange(int(seg_len.max()), device=emissions.device)
    # shape: (batch, max_seg_len)
    sub_mask = offsets[None] < seg_len[:, None]
    positions = (seg_start[:, None] + offsets[None]).clamp(max=seq_len - 1)
    sub_emissions = emissions.gather(1, positions[..., None].expand(-1, -1, num_tags))
    sub_tags = tags.gather(1, positions)
    # The fixed tag before the segment enters through its transition row, and
    # the fixed tag after it through its transition column.
    tag_before = tags.gather(1, (seg_start - 1).clamp(min=0)[:, None]).squeeze(1)
    tag_after = tags.gather(1, seg_end.clamp(max=seq_len - 1)[:, None]).squeeze(1)
    # shape: (batch, C)
    sub_start = torch.where((seg_start == 0)[:, None], start_transitions, transitions[tag_before])
    sub_end = torch.where((seg_end == lengths)[:, None], end_transitions, transitions[:, tag_after].T)
    return _SubChain(sub_emissions, sub_tags, sub_mask, positions, sub_start, sub_end)


def _pairwise_touching(
    chain: _SubChain,
    sub_nodes: Tensor,
    sub_edges: Tensor,
    tags: Tensor,
    lengths: Tensor,
    seg_start: Tensor,
    seg_end: Tensor,
) -> Tensor:
    """Place the sub-chain edges and the two boundary edges into ``(batch, seq_len - 1, C, C)``."""
    batch, seq_len = tags.shape
    num_tags = sub_nodes.shape[-1]
    pairwise = sub_nodes.new_zeros(batch, max(seq_len - 1, 0), num_tags, num_tags)
    batch_rows = torch.arange(batch, device=tags.device)
    inner = chain.mask[:, 1:]
    inner_rows = batch_rows[:, None].expand_as(inner)
    pairwise = pairwise.index_put((inner_rows[inner], chain.positions[:, :-1][inner]), sub_edges[inner])
    one_hot = torch.eye(num_tags, dtype=sub_nodes.dtype, device=sub_nodes.device)

    before = seg_start > 0
    if bool(before.any()):
        # Outer product of the fixed tag before the segment and the first marginal.
        # shape: (n, C, C)
        outer = one_hot[tags[before, seg_start[before] - 1]][:, :, None] * sub_nodes[before, 0][:, None, :]
        pairwise = pairwise.index_put((batch_rows[before], seg_start[before] - 1), outer)
    after = seg_end < lengths
    if bool(after.any()):
        last_nodes = sub_nodes[batch_rows, seg_end - seg_start - 1]
        # Outer product of the last marginal and the fixed tag after the segment.
        # shape: (n, C, C)
        outer = last_nodes[after][:, :, None] * one_hot[tags[after, seg_end[after]]][:, None, :]
        pairwise = pairwise.index_put((batch_rows[after], seg_end[after] - 1), outer)
    return pairwise


def segment_conditional(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
    seg_start: Tensor,
    seg_end: Tensor,
) -> SegmentConditional:
    """Compute the distribution of the tags in ``[seg_start, seg_end)`` given the gold tags outside it.

    Forward-backward runs over the sub-chain of the segment. The transition
    from the fixed tag before the segment (or ``start_transitions`` at the
    sentence start) scores its first tag, and the transition into the fixed
    tag after it (or ``end_transitions`` at the sentence end) scores its last.

    Parameters
    ----------
    emissions, tags, mask, transitions, start_transitions, end_transitions : Tensor
        As in :func:`path_score`.
    seg_start, seg_end : Tensor
        ``(batch,)`` integer, one half-open segment ``[seg_start, seg_end)``
        inside each sentence.

    Returns
    -------
    SegmentConditional
        ``log_likelihood`` has shape ``(batch,)``. See
        :class:`SegmentConditional` for the other fields.
    """
    emissions, mask = _validate(emissions, mask, transitions, start_transitions, end_transitions)
    tags = _check_tags(tags, emissions, mask)
    lengths = mask.sum(dim=1)
    seg_start, seg_end = _check_segments(seg_start, seg_end, lengths)
    chain = _sub_chain(
        emissions, tags, lengths, transitions, start_transitions, end_transitions, seg_start, seg_end
    )

    alphas, log_z = _forward(chain.emissions, chain.mask, transitions, chain.start, chain.end)
    betas = _backward(chain.emissions, chain.mask, transitions, chain.end)
    sub_nodes = _node_marginals(alphas, betas, chain.mask)
    sub_edges = _edge_marginals(chain.emissions, chain.mask, transitions, alphas, betas)
    gold = _path_score(chain.emissions, chain.tags, chain.mask, transitions, chain.start, chain.end)

    batch_rows = torch.arange(emissions.shape[0], device=emissions.device)[:, None].expand_as(chain.mask)
    index = (batch_rows[chain.mask], chain.positions[chain.mask])
    node_marginals = emissions.new_zeros(emissions.shape).index_put(index, sub_nodes[chain.mask])
    one_hot = torch.eye(emissions.shape[-1], dtype=emissions.dtype, device=emissions.device)
    gold_one_hot = emissions.new_zeros(emissions.shape).index_put(index, one_hot[chain.tags[chain.mask]])
    pairwise = _pairwise_touching(chain, sub_nodes, sub_edges, tags, lengths, seg_start, seg_end)
    return SegmentConditional(gold - log_z, node_marginals, node_marginals - gold_one_hot, pairwise)


def word_conditional(
    emissions: Tensor,
    tags: Tensor,
    mask: Tensor,
    transitions: Tensor,
    start_transitions: Tensor,
    end_transitions: Tensor,
) -> SegmentConditional:
    """Compute every word's conditional given the gold tags of all other words, in closed form.

    For the one-word segment ``[t, t + 1)`` the conditional is
    ``softmax_c(emissions[t, c] + transitions[y_{t-1}, c] + transitions[c, y_{t+1}])``,
    with ``start_transitions`` at the first word and ``end_transitions`` at
    the last. The result equals :func:`segment_conditional` for each ``t``.

    Returns
    -------
    SegmentConditional
        ``log_likelihood`` ``(batch, seq_len)``, zero at masked positions;
        ``marginals`` and ``residuals`` ``(batch, seq_len, num_tags)``;
        ``pairwise`` is None.
    """
    emissions, mask = _validate(emissions, mask, transitions, start_transitions, end_transitions)
    tags = _check_tags(tags, emissions, mask)
    batch, seq_len, num_tags = emissions.shape
    # Score of entering each tag from the gold tag before it.
    # shape: (batch, seq_len, C)
    entering = torch.cat([start_transitions.expand(batch, 1, num_tags), transitions[tags[:, :-1]]], dim=1)
    # Score of leaving each tag into the gold tag after it.
    # shape: (batch, seq_len, C)
    leaving = torch.cat([transitions.T[tags[:, 1:]], end_transitions.expand(batch, 1, num_tags)], dim=1)
    is_last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    leaving = torch.where(is_last[..., None], end_transitions, leaving)
    logits = emissions + entering + leaving

    weights = mask.to(emissions.dtype)
    log_probs = torch.log_softmax(logits, dim=-1)
    log_likelihood = log_probs.gather(2, tags[..., None]).squeeze(-1) * weights
    node_marginals = log_probs.exp() * weights[..., None]
    one_hot = torch.eye(num_tags, dtype=emissions.dtype, device=emissions.device)
    residuals = node_marginals - one_hot[tags] * weights[..., None]
    return SegmentConditional(log_likelihood, node_marginals, residuals, None)


# ---------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------


class CRF(torch.nn.Module):
    """Linear-chain CRF layer with learned transitions, start and end scores.

    The parameters start at zero, so an untrained CRF scores tag sequences by
    their emissions alone.

    Parameters
    ----------
    num_tags : int
        Number of tags, at least 1.
    """

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        if isinstance(num_tags, bool) or not isinstance(num_tags, int) or num_tags < 1:
            raise ValueError(f"expected num_tags to be a positive int, got {num_tags!r}")
        self.num_tags = num_tags
        self.transitions = torch.nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start_transitions = torch.nn.Parameter(torch.zeros(num_tags))
        self.end_transitions = torch.nn.Parameter(torch.zeros(num_tags))

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}"

    def _parameters_and_mask(self, emissions: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
        _check_emissions_rank(emissions)
        if emissions.shape[-1] != self.num_tags:
            raise ValueError(
                f"expected emissions with {self.num_tags} tags in the last dimension, got {emissions.shape[-1]}"
            )
        if mask is None:
            mask = torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
        return emissions, mask, self.transitions, self.start_transitions, self.end_transitions

    def forward(
        self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None, *, reduction: str = "mean"
    ) -> Tensor:
        """Compute the log-likelihood of the gold tags. The training loss is its negative.

        Parameters
        ----------
        emissions : Tensor
            ``(batch, seq_len, num_tags)`` float, same dtype as the parameters.
        tags : Tensor
            ``(batch, seq_len)`` integer.
        mask : Tensor, optional
            ``(batch, seq_len)`` bool, all True when omitted.
        reduction : {"none", "sum", "mean", "token_mean"}
            ``none`` returns ``(batch,)``, ``mean`` averages over sentences
            and ``token_mean`` divides the sum by the number of real tokens.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"expected reduction to be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        emissions, mask, transitions, start, end = self._parameters_and_mask(emissions, mask)
        emissions, mask = _validate(emissions, mask, transitions, start, end)
        tags = _check_tags(tags, emissions, mask)
        log_likelihood = _path_score(emissions, tags, mask, transitions, start, end) - _forward(
            emissions, mask, transitions, start, end
        )[1]
        if reduction == "none":
            return log_likelihood
        if reduction == "sum":
            return log_likelihood.sum()
        if reduction == "mean":
            return log_likelihood.mean()
        return log_likelihood.sum() / mask.sum()

    def log_partition(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute ``log Z(x)`` per sentence, shape ``(batch,)``, as :func:`log_partition` does."""
        return log_partition(*self._parameters_and_mask(emissions, mask))

    def marginals(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute node marginals, shape ``(batch, seq_len, num_tags)``, as :func:`marginals` does."""
        return marginals(*self._parameters_and_mask(emissions, mask))

    def pairwise_marginals(self, emissions: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute edge marginals, shape ``(batch, seq_len - 1, C, C)``, as :func:`pairwise_marginals` does."""
        return pairwise_marginals(*self._parameters_and_mask(emissions, mask))

    def decode(
        self,
        emissions: Tensor,
        mask: Tensor | None = None,
        *,
        allowed_start: Tensor | None = None,
        allowed: Tensor | None = None,
        allowed_end: Tensor | None = None,
    ) -> list[list[int]]:
        """Find the best tag sequence per sentence, as :func:`viterbi_decode` does."""
        return viterbi_decode(
            *self._parameters_and_mask(emissions, mask),
            allowed_start=allowed_start,
            allowed=allowed,
            allowed_end=allowed_end,
        )

    def segment_conditional(
        self, emissions: Tensor, tags: Tensor, mask: Tensor | None, seg_start: Tensor, seg_end: Tensor
    ) -> SegmentConditional:
        """Compute the conditional of ``[seg_start, seg_end)``, as :func:`segment_conditional` does."""
        emissions, mask, transitions, start, end = self._parameters_and_mask(emissions, mask)
        return segment_conditional(emissions, tags, mask, transitions, start, end, seg_start, seg_end)

    def word_conditional(self, emissions: Tensor, tags: Tensor, mask: Tensor | None = None) -> SegmentConditional:
        """Compute every word's own conditional, as :func:`word_conditional` does."""
        emissions, mask, transitions, start, end = self._parameters_and_mask(emissions, mask)
        return word_conditional(emissions, tags, mask, transitions, start, end)
