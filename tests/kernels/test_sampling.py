import math

import pytest
import torch
from scipy.stats import chisquare

from specserve.kernels.sampling import constrain_logits, logprobs_topk, process_logits, random_uniform, sample


def test_process_logits_worked_example():
    logits = torch.tensor([0.1, 0.4, 0.3, 0.2]).log()
    probs = process_logits(logits, temperature=1.0, top_p=0.6, top_k=3)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([0.0, 4 / 7, 3 / 7, 0.0]))


def test_temperature_only_is_tempered_softmax():
    logits = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(process_logits(logits, 0.5), torch.softmax(logits / 0.5, dim=-1))


def test_top_p_keeps_smallest_set_reaching_the_mass():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert (process_logits(logits, 1.0, top_p=0.79) > 0).tolist() == [True, True, False, False]
    assert (process_logits(logits, 1.0, top_p=0.81) > 0).tolist() == [True, True, True, False]
    # A tiny top_p still keeps the most likely token.
    torch.testing.assert_close(process_logits(logits, 1.0, top_p=1e-6), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_top_k_only():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs = process_logits(logits, 1.0, top_k=2)
    torch.testing.assert_close(probs, torch.softmax(torch.tensor([[-math.inf, 3.0, 2.0, -math.inf]]), -1))


def test_per_row_parameters_broadcast_over_nodes():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 6, generator=gen)
    temperature = torch.tensor([0.5, 1.0, 2.0])
    top_p = torch.tensor([1.0, 0.5, 0.9])
    top_k = torch.tensor([0, 3, 2])
    batched = process_logits(logits, temperature, top_p, top_k)
    for b in range(3):
        alone = process_logits(logits[b], temperature[b].item(), top_p[b].item(), int(top_k[b]))
        torch.testing.assert_close(batched[b], alone)
    assert (batched[2] > 0).sum(-1).tolist() == [2, 2]  # top_k=2 cut row 2 on both nodes


def test_dtypes():
    logits = torch.randn(2, 5)
    assert process_logits(logits.to(torch.bfloat16), 0.7, 0.9).dtype == torch.float32
    assert process_logits(logits.double(), 0.7, 0.9).dtype == torch.float64


def test_zero_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        process_logits(torch.randn(4), 0.0)


def test_sample_matches_distribution_and_skips_zero_probability():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    draws = sample(probs.expand(20000, 4), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4)
    assert counts[1] == 0
    keep = probs > 0
    assert chisquare(counts[keep].numpy(), (probs[keep] * 20000).numpy()).pvalue > 1e-3


def test_sample_is_reproducible_with_a_seed():
    probs = torch.softmax(torch.randn(4, 3, 50), -1)
    first = sample(probs, torch.Generator().manual_seed(7))
    assert torch.equal(first, sample(probs, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, sample(probs, torch.Generator().manual_seed(8)))


def test_generator_per_row_gives_each_row_its_own_stream():
    gens = [torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(3)]
    rows = random_uniform((3, 5), gens, torch.device("cpu"))
    assert torch.equal(rows[0], torch.rand(5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(rows[2], torch.rand(5, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="generators"):
        random_uniform((2, 5), gens, torch.device("cpu"))


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, -1.0, 3.0, -2.0]])
    out = logprobs_topk(logits, torch.tensor([1, -1]), k=2)
    expected = torch.log_softmax(logits, -1)
    assert out.top_ids.tolist() == [[0, 1], [2, 0]]
    torch.testing.assert_close(out.top_values, expected.gather(1, out.top_ids))
    assert out.chosen[0].item() == pytest.approx(expected[0, 1].item())
    assert math.isnan(out.chosen[1].item())


def test_constrain_logits_adds_the_bias_and_bans_end_tokens_below_a_depth():
    logits = torch.zeros(2, 4, 6)
    depths = torch.tensor([[0, 1, 2, 1], [0, 1, 1, 2]])
    bias = torch.zeros(2, 6)
    bias[0, 3], bias[1, 1] = 5.0, -100.0
    out = constrain_logits(logits, depths, bias, end_ids=torch.tensor([0, 5]), end_banned=torch.tensor([2, 0]))
    assert torch.equal(logits, torch.zeros(2, 4, 6))  # the input is left as it was
    assert torch.equal(out[0, :, 3], torch.full((4,), 5.0)) and torch.equal(out[1, :, 1], torch.full((4,), -100.0))
    # row 0 (the docstring's 3 emitted, min_tokens 5): depths 0 and 1 may not end, depth 2 may
    assert torch.isneginf(out[0, [0, 1, 3]][:, [0, 5]]).all() and torch.equal(out[0, 2, [0, 5]], torch.zeros(2))
    assert not torch.isinf(out[1]).any()  # row 1: nothing banned
    assert out[0].argmax(-1).tolist() == [3, 3, 3, 3]


def test_constrain_logits_without_constraints_is_the_identity():
    logits, depths = torch.randn(3, 5, 7), torch.zeros(3, 5, dtype=torch.long)
    assert constrain_logits(logits, depths) is logits
    assert constrain_logits(logits, depths, None, torch.tensor([1]), torch.zeros(3, dtype=torch.long)) is logits
