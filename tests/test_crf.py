"""CRF kernels against brute-force enumeration of every tag sequence, and against autograd."""

from __future__ import annotations

import itertools

import pytest
import torch

from segflu_core.crf import (
    CRF,
    log_partition,
    marginals,
    pairwise_marginals,
    path_score,
    segment_conditional,
    viterbi_decode,
    word_conditional,
)

RTOL = 1e-9
ATOL = 1e-9

NUM_TAGS = 3
LENGTHS = [4, 1, 3, 2]


def make_inputs(seed: int, lengths=LENGTHS, num_tags=NUM_TAGS, dtype=torch.float64, scale=1.0):
    """Draw random potentials and gold tags for a padded batch with the given sentence lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch, seq_len = len(lengths), max(lengths)
    emissions = torch.randn(batch, seq_len, num_tags, generator=generator, dtype=dtype) * scale
    transitions = torch.randn(num_tags, num_tags, generator=generator, dtype=dtype)
    start = torch.randn(num_tags, generator=generator, dtype=dtype)
    end = torch.randn(num_tags, generator=generator, dtype=dtype)
    tags = torch.randint(0, num_tags, (batch, seq_len), generator=generator)
    mask = torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]
    # Padding tags hold an index outside the tag range, which the kernels must ignore.
    tags = tags.masked_fill(~mask, -100)
    return emissions, tags, mask, transitions, start, end


def sequence_score(emissions, path, transitions, start, end) -> float:
    """Compute the score of one tag sequence of one sentence, term by term."""
    score = start[path[0]] + end[path[-1]]
    for t, tag in enumerate(path):
        score = score + emissions[t, tag]
        if t > 0:
            score = score + transitions[path[t - 1], tag]
    return float(score)


def enumerate_scores(emissions, length, transitions, start, end, fixed=None) -> dict:
    """Map every tag sequence of the first ``length`` positions to its score.

    ``fixed`` maps positions to the only tag allowed there.
    """
    fixed = fixed or {}
    num_tags = emissions.shape[-1]
    scores = {}
    for path in itertools.product(range(num_tags), repeat=length):
        if all(path[t] == tag for t, tag in fixed.items()):
            scores[path] = sequence_score(emissions, path, transitions, start, end)
    return scores


def brute_force(scores: dict, length: int, num_tags: int):
    """Return log Z, node marginals (length, C) and edge marginals (length - 1, C, C)."""
    values = torch.tensor(list(scores.values()), dtype=torch.float64)
    log_z = torch.logsumexp(values, dim=0)
    probs = (values - log_z).exp()
    nodes = torch.zeros(length, num_tags, dtype=torch.float64)
    edges = torch.zeros(max(length - 1, 0), num_tags, num_tags, dtype=torch.float64)
    for path, prob in zip(scores, probs):
        for t, tag in enumerate(path):
            nodes[t, tag] += prob
            if t > 0:
                edges[t - 1, path[t - 1], tag] += prob
    return float(log_z), nodes, edges


def assert_close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=RTOL, atol=ATOL)


def test_log_partition_matches_enumeration():
    emissions, _, mask, transitions, start, end = make_inputs(0)
    result = log_partition(emissions, mask, transitions, start, end)
    assert result.shape == (len(LENGTHS),)
    for i, length in enumerate(LENGTHS):
        scores = enumerate_scores(emissions[i], length, transitions, start, end)
        expected, _, _ = brute_force(scores, length, NUM_TAGS)
        assert_close(result[i], torch.tensor(expected, dtype=torch.float64))


def test_path_score_and_log_likelihood_match_enumeration():
    emissions, tags, mask, transitions, start, end = make_inputs(1)
    scores = path_score(emissions, tags, mask, transitions, start, end)
    crf = CRF(NUM_TAGS).double()
    with torch.no_grad():
        crf.transitions.copy_(transitions)
        crf.start_transitions.copy_(start)
        crf.end_transitions.copy_(end)
    log_likelihood = crf(emissions, tags, mask, reduction="none")
    for i, length in enumerate(LENGTHS):
        gold = tuple(tags[i, :length].tolist())
        all_scores = enumerate_scores(emissions[i], length, transitions, start, end)
        log_z, _, _ = brute_force(all_scores, length, NUM_TAGS)
        assert_close(scores[i], torch.tensor(all_scores[gold], dtype=torch.float64))
        assert_close(log_likelihood[i], torch.tensor(all_scores[gold] - log_z, dtype=torch.float64))


def test_marginals_match_enumeration():
    emissions, _, mask, transitions, start, end = make_inputs(2)
    nodes = marginals(emissions, mask, transitions, start, end)
    edges = pairwise_marginals(emissions, mask, transitions, start, end)
    assert nodes.shape == emissions.shape
    assert edges.shape == (len(LENGTHS), max(LENGTHS) - 1, NUM_TAGS, NUM_TAGS)
    for i, length in enumerate(LENGTHS):
        scores = enumerate_scores(emissions[i], length, transitions, start, end)
        _, expected_nodes, expected_edges = brute_force(scores, length, NUM_TAGS)
        assert_close(nodes[i, :length], expected_nodes)
        assert_close(nodes[i, length:], torch.zeros_like(nodes[i, length:]))
        assert_close(edges[i, : length - 1], expected_edges)
        assert_close(edges[i, length - 1 :], torch.zeros_like(edges[i, length - 1 :]))


def test_marginals_equal_log_partition_gradient():
    emissions, _, mask, transitions, start, end = make_inputs(3)
    emissions = emissions.clone().requires_grad_(True)
    transitions = transitions.clone().requires_grad_(True)
    log_z = log_partition(emissions, mask, transitions, start, end)
    emission_grad, transition_grad = torch.autograd.grad(log_z.sum(), (emissions, transitions))
    with torch.no_grad():
        assert_close(marginals(emissions, mask, transitions, start, end), emission_grad)
        edges = pairwise_marginals(emissions, mask, transitions, start, end)
        assert_close(edges.sum(dim=(0, 1)), transition_grad)


def test_viterbi_matches_enumeration():
    emissions, _, mask, transitions, start, end = make_inputs(4)
    paths = viterbi_decode(emissions, mask, transitions, start, end)
    assert [len(path) for path in paths] == LENGTHS
    for i, length in enumerate(LENGTHS):
        scores = enumerate_scores(emissions[i], length, transitions, start, end)
        assert tuple(paths[i]) == max(scores, key=scores.get)


def test_viterbi_respects_allowed_masks():
    emissions, _, mask, transitions, start, end = make_inputs(5)
    generator = torch.Generator().manual_seed(5)
    allowed = torch.rand(NUM_TAGS, NUM_TAGS, generator=generator) > 0.4
    allowed[0, 0] = True
    allowed_start = torch.tensor([True, False, True])
    allowed_end = torch.tensor([True, True, False])
    # Tag 0 can start, repeat and end, so every sentence has an allowed sequence.
    paths = viterbi_decode(
        emissions, mask, transitions, start, end,
        allowed_start=allowed_start, allowed=allowed, allowed_end=allowed_end,
    )
    for i, length in enumerate(LENGTHS):
        scores = enumerate_scores(emissions[i], length, transitions, start, end)
        permitted = {
            path: score
            for path, score in scores.items()
            if allowed_start[path[0]]
            and allowed_end[path[-1]]
            and all(allowed[a, b] for a, b in zip(path, path[1:]))
        }
        assert tuple(paths[i]) == max(permitted, key=permitted.get)


def test_viterbi_rejects_fully_forbidden_sentence():
    emissions, _, mask, transitions, start, end = make_inputs(6)
    nothing = torch.zeros(NUM_TAGS, dtype=torch.bool)
    with pytest.raises(ValueError, match="expected at least one tag sequence"):
        viterbi_decode(emissions, mask, transitions, start, end, allowed_end=nothing)


def all_segments():
    """Yield every (sentence, start, end) with 0 <= start < end <= length."""
    for i, length in enumerate(LENGTHS):
        for seg_start in range(length):
            for seg_end in range(seg_start + 1, length + 1):
                yield i, seg_start, seg_end


def test_segment_conditional_matches_enumeration():
    emissions, tags, mask, transitions, start, end = make_inputs(7)
    for i, seg_start, seg_end in all_segments():
        length = LENGTHS[i]
        gold = tags[i, :length].tolist()
        fixed = {t: gold[t] for t in range(length) if not seg_start <= t < seg_end}
        scores = enumerate_scores(emissions[i], length, transitions, start, end, fixed=fixed)
        log_z, nodes, _ = brute_force(scores, length, NUM_TAGS)
        result = segment_conditional(
            emissions[i : i + 1], tags[i : i + 1], mask[i : i + 1], transitions, start, end,
            torch.tensor([seg_start]), torch.tensor([seg_end]),
        )
        expected_nodes = torch.zeros(max(LENGTHS), NUM_TAGS, dtype=torch.float64)
        expected_nodes[seg_start:seg_end] = nodes[seg_start:seg_end]
        assert_close(result.log_likelihood[0], torch.tensor(scores[tuple(gold)] - log_z, dtype=torch.float64))
        assert_close(result.marginals[0], expected_nodes)


def test_whole_sentence_segment_is_unconstrained():
    emissions, tags, mask, transitions, start, end = make_inputs(8)
    lengths = mask.sum(dim=1)
    result = segment_conditional(
        emissions, tags, mask, transitions, start, end, torch.zeros_like(lengths), lengths
    )
    gold = path_score(emissions, tags, mask, transitions, start, end)
    assert_close(result.log_likelihood, gold - log_partition(emissions, mask, transitions, start, end))
    assert_close(result.marginals, marginals(emissions, mask, transitions, start, end))
    assert_close(result.pairwise, pairwise_marginals(emissions, mask, transitions, start, end))


def conditional_negative_log_likelihood(emissions, tags, mask, transitions, start, end, seg_start, seg_end):
    """Compute the segment's conditional negative log-likelihood from a clamped log-partition, for autograd."""
    length = int(mask.sum())
    gold = tags[0, :length].tolist()
    # Forbidding every other tag outside the segment leaves the paths that agree with the gold tags there.
    clamp = torch.zeros_like(emissions)
    for t in range(length):
        if not seg_start <= t < seg_end:
            clamp[0, t] = float("-inf")
            clamp[0, t, gold[t]] = 0.0
    clamped_log_z = log_partition(emissions + clamp, mask, transitions, start, end)
    full_score = path_score(emissions, tags, mask, transitions, start, end)
    return (clamped_log_z - full_score).sum()


def test_segment_residuals_and_pairwise_match_autograd():
    emissions, tags, mask, transitions, start, end = make_inputs(9)
    for i, seg_start, seg_end in all_segments():
        length = LENGTHS[i]
        parameters = [x.clone().requires_grad_(True) for x in (emissions[i : i + 1], transitions, start, end)]
        row_emissions, row_transitions, row_start, row_end = parameters
        nll = conditional_negative_log_likelihood(
            row_emissions, tags[i : i + 1], mask[i : i + 1], row_transitions, row_start, row_end, seg_start, seg_end
        )
        grads = torch.autograd.grad(nll, parameters)
        with torch.no_grad():
            result = segment_conditional(
                row_emissions, tags[i : i + 1], mask[i : i + 1], row_transitions, row_start, row_end,
                torch.tensor([seg_start]), torch.tensor([seg_end]),
            )
        assert_close(result.residuals, grads[0])

        # The gold transitions on edges touching the segment are subtracted from the expected counts.
        gold = tags[i, :length].tolist()
        observed = torch.zeros(NUM_TAGS, NUM_TAGS, dtype=torch.float64)
        for t in range(max(seg_start - 1, 0), min(seg_end, length - 1)):
            observed[gold[t], gold[t + 1]] += 1
        assert_close(result.pairwise.sum(dim=(0, 1)) - observed, grads[1])

        one_hot = torch.eye(NUM_TAGS, dtype=torch.float64)
        expected_start = result.residuals[0, 0] if seg_start == 0 else torch.zeros(NUM_TAGS, dtype=torch.float64)
        expected_end = (
            result.residuals[0, length - 1] if seg_end == length else torch.zeros(NUM_TAGS, dtype=torch.float64)
        )
        assert_close(grads[2], expected_start)
        assert_close(grads[3], expected_end)
        inside = torch.zeros(1, max(LENGTHS), 1, dtype=torch.float64)
        inside[0, seg_start:seg_end] = 1.0
        gold_one_hot = one_hot[tags[i : i + 1].clamp(min=0)] * inside
        assert_close(result.residuals, result.marginals - gold_one_hot)


def test_segment_log_likelihood_backpropagates_residuals():
    emissions, tags, mask, transitions, start, end = make_inputs(19)
    emissions = emissions.clone().requires_grad_(True)
    seg_start = torch.tensor([1, 0, 0, 1])
    seg_end = torch.tensor([3, 1, 2, 2])
    result = segment_conditional(emissions, tags, mask, transitions, start, end, seg_start, seg_end)
    (emission_grad,) = torch.autograd.grad(-result.log_likelihood.sum(), emissions)
    assert_close(emission_grad, result.residuals.detach())


def test_single_token_sentences():
    emissions, tags, mask, transitions, start, end = make_inputs(20, lengths=[1, 1])
    edges = pairwise_marginals(emissions, mask, transitions, start, end)
    assert edges.shape == (2, 0, NUM_TAGS, NUM_TAGS)
    result = segment_conditional(
        emissions, tags, mask, transitions, start, end, torch.tensor([0, 0]), torch.tensor([1, 1])
    )
    assert result.pairwise.shape == (2, 0, NUM_TAGS, NUM_TAGS)
    # A one-token sentence is a softmax over start + emission + end.
    expected = torch.softmax(emissions[:, 0] + start + end, dim=-1)
    assert_close(result.marginals[:, 0], expected)
    assert_close(marginals(emissions, mask, transitions, start, end)[:, 0], expected)
    assert viterbi_decode(emissions, mask, transitions, start, end) == [[int(x)] for x in expected.argmax(dim=-1)]


def test_segment_pairwise_is_zero_away_from_segment():
    emissions, tags, mask, transitions, start, end = make_inputs(10, lengths=[4])
    result = segment_conditional(emissions, tags, mask, transitions, start, end, torch.tensor([2]), torch.tensor([3]))
    # Edges 1 and 2 touch position 2, and edge 0 joins two fixed tags.
    assert_close(result.pairwise[0, 0], torch.zeros(NUM_TAGS, NUM_TAGS, dtype=torch.float64))
    assert float(result.pairwise[0, 1].sum()) == pytest.approx(1.0)
    assert float(result.pairwise[0, 2].sum()) == pytest.approx(1.0)


def test_batched_segments_equal_single_sentences():
    emissions, tags, mask, transitions, start, end = make_inputs(11)
    seg_start = torch.tensor([1, 0, 2, 0])
    seg_end = torch.tensor([3, 1, 3, 2])
    batched = segment_conditional(emissions, tags, mask, transitions, start, end, seg_start, seg_end)
    for i in range(len(LENGTHS)):
        single = segment_conditional(
            emissions[i : i + 1], tags[i : i + 1], mask[i : i + 1], transitions, start, end,
            seg_start[i : i + 1], seg_end[i : i + 1],
        )
        for name in ("log_likelihood", "marginals", "residuals", "pairwise"):
            assert_close(getattr(batched, name)[i], getattr(single, name)[0])


def test_word_conditional_equals_one_word_segments():
    emissions, tags, mask, transitions, start, end = make_inputs(12)
    words = word_conditional(emissions, tags, mask, transitions, start, end)
    assert words.pairwise is None
    assert words.log_likelihood.shape == mask.shape
    for i, length in enumerate(LENGTHS):
        for t in range(length):
            segment = segment_conditional(
                emissions[i : i + 1], tags[i : i + 1], mask[i : i + 1], transitions, start, end,
                torch.tensor([t]), torch.tensor([t + 1]),
            )
            assert_close(words.log_likelihood[i, t], segment.log_likelihood[0])
            assert_close(words.marginals[i, t], segment.marginals[0, t])
            assert_close(words.residuals[i, t], segment.residuals[0, t])
        padding = words.log_likelihood[i, length:]
        assert_close(padding, torch.zeros_like(padding))
        assert_close(words.marginals[i, length:], torch.zeros_like(words.marginals[i, length:]))


def test_batched_kernels_equal_single_sentences():
    emissions, tags, mask, transitions, start, end = make_inputs(13)
    nodes = marginals(emissions, mask, transitions, start, end)
    edges = pairwise_marginals(emissions, mask, transitions, start, end)
    log_z = log_partition(emissions, mask, transitions, start, end)
    paths = viterbi_decode(emissions, mask, transitions, start, end)
    for i, length in enumerate(LENGTHS):
        row = emissions[i : i + 1, :length]
        row_mask = mask[i : i + 1, :length]
        assert_close(log_z[i], log_partition(row, row_mask, transitions, start, end)[0])
        assert_close(nodes[i, :length], marginals(row, row_mask, transitions, start, end)[0])
        assert_close(edges[i, : length - 1], pairwise_marginals(row, row_mask, transitions, start, end)[0])
        assert paths[i] == viterbi_decode(row, row_mask, transitions, start, end)[0]


def test_padding_values_are_ignored():
    emissions, tags, mask, transitions, start, end = make_inputs(21)
    noisy = emissions.masked_fill(~mask[..., None], float("nan")).requires_grad_(True)
    potentials = (transitions, start, end)
    assert_close(log_partition(noisy, mask, *potentials), log_partition(emissions, mask, *potentials))
    assert_close(marginals(noisy, mask, *potentials), marginals(emissions, mask, *potentials))
    assert_close(pairwise_marginals(noisy, mask, *potentials), pairwise_marginals(emissions, mask, *potentials))
    assert viterbi_decode(noisy, mask, *potentials) == viterbi_decode(emissions, mask, *potentials)
    words = word_conditional(noisy, tags, mask, *potentials)
    assert_close(words.residuals, word_conditional(emissions, tags, mask, *potentials).residuals)
    lengths = mask.sum(dim=1)
    segment = segment_conditional(noisy, tags, mask, *potentials, lengths - 1, lengths)
    clean_segment = segment_conditional(emissions, tags, mask, *potentials, lengths - 1, lengths)
    assert_close(segment.pairwise, clean_segment.pairwise)
    (emission_grad,) = torch.autograd.grad(log_partition(noisy, mask, *potentials).sum(), noisy)
    assert_close(emission_grad, marginals(emissions, mask, *potentials))


def test_reductions():
    emissions, tags, mask, transitions, start, end = make_inputs(14)
    crf = CRF(NUM_TAGS).double()
    with torch.no_grad():
        crf.transitions.copy_(transitions)
    per_sentence = crf(emissions, tags, mask, reduction="none")
    assert per_sentence.shape == (len(LENGTHS),)
    assert_close(crf(emissions, tags, mask, reduction="sum"), per_sentence.sum())
    assert_close(crf(emissions, tags, mask, reduction="mean"), per_sentence.sum() / len(LENGTHS))
    assert_close(crf(emissions, tags, mask, reduction="token_mean"), per_sentence.sum() / sum(LENGTHS))
    assert_close(crf(emissions, tags, mask), crf(emissions, tags, mask, reduction="mean"))


def test_module_without_mask_uses_whole_sequence():
    emissions, tags, _, transitions, start, end = make_inputs(15, lengths=[3, 3])
    crf = CRF(NUM_TAGS).double()
    full = torch.ones(2, 3, dtype=torch.bool)
    zeros = torch.zeros(NUM_TAGS, dtype=torch.float64)
    zero_transitions = torch.zeros(NUM_TAGS, NUM_TAGS, dtype=torch.float64)
    assert_close(crf.log_partition(emissions), log_partition(emissions, full, zero_transitions, zeros, zeros))
    assert_close(crf.marginals(emissions), marginals(emissions, full, zero_transitions, zeros, zeros))
    assert crf.decode(emissions) == emissions.argmax(dim=-1).tolist()


def test_float32_long_sentences_stay_stable():
    lengths = [300, 180]
    emissions, tags, mask, transitions, start, end = make_inputs(16, lengths=lengths, num_tags=9, scale=20.0)
    single = [x.float() for x in (emissions, transitions, start, end)]
    nodes = marginals(single[0], mask, *single[1:])
    edges = pairwise_marginals(single[0], mask, *single[1:])
    log_z = log_partition(single[0], mask, *single[1:])
    assert torch.isfinite(nodes).all()
    assert torch.isfinite(edges).all()
    assert torch.isfinite(log_z).all()
    totals = nodes.sum(dim=-1)[mask]
    torch.testing.assert_close(totals, torch.ones_like(totals), rtol=0, atol=1e-4)
    reference = marginals(emissions, mask, transitions, start, end)
    torch.testing.assert_close(nodes.double(), reference, rtol=0, atol=1e-4)
    reference_log_z = log_partition(emissions, mask, transitions, start, end)
    torch.testing.assert_close(log_z.double(), reference_log_z, rtol=1e-6, atol=0)
    words = word_conditional(single[0], tags, mask, *single[1:])
    assert torch.isfinite(words.log_likelihood).all()
    segment = segment_conditional(
        single[0], tags, mask, *single[1:], torch.tensor([10, 0]), torch.tensor([290, 180])
    )
    assert torch.isfinite(segment.log_likelihood).all()
    segment_totals = segment.marginals.sum(dim=-1)[:, 10:180]
    torch.testing.assert_close(segment_totals, torch.ones_like(segment_totals), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e, m, tr, s, en: (e[0], m, tr, s, en), "expected emissions with 3 dimensions"),
        (lambda e, m, tr, s, en: (e, m, tr[:2], s, en), r"expected transitions of shape \(3, 3\)"),
        (lambda e, m, tr, s, en: (e, m, tr, s[:2], en), r"expected start_transitions of shape \(3,\)"),
        (lambda e, m, tr, s, en: (e, m, tr, s, en.float()), "expected end_transitions of dtype torch.float64"),
        (lambda e, m, tr, s, en: (e, m[:, :2], tr, s, en), r"expected mask of shape \(4, 4\)"),
        (lambda e, m, tr, s, en: (e, ~m, tr, s, en), "expected the first mask column to be all True"),
        (lambda e, m, tr, s, en: (e, m.flip(1) | (torch.arange(4) == 0), tr, s, en), "left-aligned prefix"),
    ],
)
def test_invalid_inputs_raise_value_error(change, message):
    emissions, _, mask, transitions, start, end = make_inputs(17)
    with pytest.raises(ValueError, match=message):
        log_partition(*change(emissions, mask, transitions, start, end))


def test_invalid_tags_segments_and_reduction_raise():
    emissions, tags, mask, transitions, start, end = make_inputs(18)
    potentials = (transitions, start, end)
    with pytest.raises(ValueError, match=r"expected tags of shape \(4, 4\)"):
        path_score(emissions, tags[:, :3], mask, *potentials)
    with pytest.raises(ValueError, match=r"expected tags in \[0, 3\)"):
        path_score(emissions, tags.masked_fill(mask, 3), mask, *potentials)
    with pytest.raises(ValueError, match="expected integer tags"):
        path_score(emissions, tags.double(), mask, *potentials)
    with pytest.raises(ValueError, match="expected 0 <= seg_start < seg_end <= sentence length"):
        segment_conditional(emissions, tags, mask, *potentials, torch.tensor([0, 0, 0, 0]), torch.tensor([1, 2, 1, 1]))
    with pytest.raises(ValueError, match=r"expected seg_end of shape \(4,\)"):
        segment_conditional(emissions, tags, mask, *potentials, torch.tensor([0, 0, 0, 0]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expected allowed of shape \(3, 3\)"):
        viterbi_decode(emissions, mask, *potentials, allowed=torch.ones(2, 2, dtype=torch.bool))
    crf = CRF(NUM_TAGS).double()
    with pytest.raises(ValueError, match="expected reduction to be one of"):
        crf(emissions, tags, mask, reduction="average")
    with pytest.raises(ValueError, match="expected emissions with 3 tags"):
        crf(emissions[..., :2], tags, mask)
    with pytest.raises(ValueError, match="expected num_tags to be a positive int"):
        CRF(0)
