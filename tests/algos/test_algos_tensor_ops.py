import math

import pytest
import torch

from verl_mtp.algos import (LossAggregation, agg_loss, entropy_from_logits, logprobs_from_logits, masked_mean,
                            masked_sum)

# 2 x 3 example: row 0 has 2 response tokens, row 1 has 3.
LOSS = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_masked_sum_and_mean_ignore_padding_even_if_inf():
    x = torch.tensor([[1.0, 2.0, -math.inf], [3.0, 4.0, 5.0]])
    assert masked_sum(x, MASK).item() == 15.0
    assert masked_mean(x, MASK).item() == 3.0
    torch.testing.assert_close(masked_mean(x, MASK, dim=-1), torch.tensor([1.5, 4.0]))


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4 + 5) / 5),  # 3.0
        ("seq-mean-token-sum", (3 + 12) / 2),  # 7.5
        ("seq-mean-token-mean", (1.5 + 4.0) / 2),  # 2.75
        ("seq-mean-token-sum-norm", (3 + 12) / 3),  # 5.0: summed over sequences, horizon T = 3 (verl)
    ],
)
def test_agg_loss_modes_on_2x3(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_dr_grpo_divides_by_the_constant_horizon_not_the_padded_width():
    # verl's loss_scale_factor: the max response length (here 8), whatever width this batch was padded to
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", horizon=8).item() == pytest.approx((3 + 12) / 8)
    wider = torch.nn.functional.pad(LOSS, (0, 5)), torch.nn.functional.pad(MASK, (0, 5))
    assert agg_loss(*wider, "seq-mean-token-sum-norm", horizon=8).item() == pytest.approx((3 + 12) / 8)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 15 / 5),
        ("seq-mean-token-sum", (3 + 12) / 2),  # the empty row is not a sequence: / 2, not / 3
        ("seq-mean-token-mean", (1.5 + 4.0) / 2),
        ("seq-mean-token-sum-norm", (3 + 12) / 3),
    ],
)
def test_a_fully_masked_row_does_not_count(mode, expected):
    loss = torch.cat([LOSS, torch.full((1, 3), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    assert agg_loss(loss, mask, mode).item() == pytest.approx(expected)


def test_agg_loss_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(LOSS, MASK, "sum")


def test_token_mean_with_global_count_sums_over_micro_batches_to_full_batch():
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.4).int()
    full = agg_loss(loss, mask, "token-mean")
    tokens = mask.sum()
    halves = (slice(0, 2), slice(2, 6))
    micro = [agg_loss(loss[s], mask[s], "token-mean", global_token_count=tokens) for s in halves]
    torch.testing.assert_close(sum(micro), full)
    # Without the global count, averaging micro-batch means weights tokens unequally.
    assert not torch.allclose(sum(agg_loss(loss[s], mask[s], "token-mean") for s in halves) / 2, full)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_seq_modes_with_global_seq_count_sum_to_full_batch(mode):
    torch.manual_seed(1)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.4).int()
    mask[2] = 0  # a row without response tokens: 5 sequences count
    # The token count is ignored by seq-* modes, so callers may always pass both.
    parts = (slice(0, 1), slice(1, 6))
    micro = [agg_loss(loss[s], mask[s], mode, global_token_count=999, global_seq_count=5, horizon=7) for s in parts]
    torch.testing.assert_close(sum(micro), agg_loss(loss, mask, mode, horizon=7))


def test_loss_aggregation_binds_the_settings():
    agg = LossAggregation("seq-mean-token-sum-norm", global_token_count=10, global_seq_count=4, horizon=5)
    assert agg(LOSS, MASK).item() == pytest.approx(15 / 5)
    assert agg(LOSS, MASK, mode="seq-mean-token-mean").item() == pytest.approx((1.5 + 4.0) / 4)
    assert agg(LOSS, MASK, mode="token-mean").item() == pytest.approx(15 / 10)


def test_entropy_of_uniform_is_log_vocab():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))


def test_entropy_two_way_and_large_logits_stable():
    # softmax([0, ln 3]) = [1/4, 3/4]; shifting by 1e4 must not change it.
    p = torch.tensor([0.25, 0.75])
    expected = -(p * p.log()).sum()
    logits = torch.tensor([[0.0, math.log(3)], [1e4, 1e4 + math.log(3)]])
    torch.testing.assert_close(entropy_from_logits(logits), expected.expand(2))


def test_entropy_with_masked_vocab_is_finite_in_value_and_gradient():
    logits = torch.tensor([0.0, 0.0, -math.inf, -math.inf], requires_grad=True)
    entropy = entropy_from_logits(logits)
    entropy.backward()
    assert entropy.item() == pytest.approx(math.log(2))
    assert torch.isfinite(logits.grad).all()


def test_logprobs_from_logits_known_values_and_stability():
    logits = torch.tensor([[[0.0, math.log(3)], [1000.0, 1000.0 + math.log(3)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)


def test_logprobs_from_logits_matches_log_softmax_and_upcasts_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11)
    labels = torch.randint(0, 11, (3, 4))
    reference = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), reference)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32
