"""MTP loss types (ce / soft_ce / tv) and the expected acceptance, against hand-computed numbers."""

import math

import pytest
import torch

from verl_mtp.algos.mtp_loss import (Warp, compute_mtp_loss, draft_losses, expected_accept, expected_acceptance,
                                     mtp_token_losses, policy_rows)
from verl_mtp.algos.warping import warp_probs

# one position, vocabulary of 3: the policy p = (.5, .3, .2), the draft q = (.2, .3, .5)
P = torch.tensor([[0.5, 0.3, 0.2]])
Q = torch.tensor([[0.2, 0.3, 0.5]])
TOKEN = torch.tensor([0])


def _losses(loss_type, warp=Warp()):
    return draft_losses(Q.log(), TOKEN, P.log(), loss_type, warp)


def test_untruncated_at_t1():
    ce, accept = _losses("ce")
    assert ce.item() == pytest.approx(-math.log(0.2), abs=1e-6)
    assert accept.item() == pytest.approx(0.2 + 0.3 + 0.2, abs=1e-6)  # sum min(p, q)
    soft, _ = _losses("soft_ce")
    assert soft.item() == pytest.approx(-(0.5 * math.log(0.2) + 0.3 * math.log(0.3) + 0.2 * math.log(0.5)), abs=1e-6)
    tv, _ = _losses("tv")
    assert tv.item() == pytest.approx(0.3, abs=1e-6)


def test_top_k_and_top_p_warp_both_sides():
    # top-2 keeps p's {0, 1} -> (.625, .375, 0) and q's {1, 2} -> (0, .375, .625); min-sum .375
    for warp in (Warp(1.0, top_k=2), Warp(1.0, top_p=0.75)):  # top-p .75: both keep their top two
        tv, accept = _losses("tv", warp)
        assert accept.item() == pytest.approx(0.375, abs=1e-6)
        assert tv.item() == pytest.approx(0.625, abs=1e-6)
        soft, _ = _losses("soft_ce", warp)  # the draft side is not truncated (log q stays finite)
        assert soft.item() == pytest.approx(-(0.625 * math.log(0.2) + 0.375 * math.log(0.3)), abs=1e-6)
    # top-p .5: p keeps only token 0, q only token 2 -> nothing in common
    assert _losses("tv", Warp(1.0, top_p=0.5))[1].item() == pytest.approx(0.0)


def test_temperature():
    # T=2: p ~ sqrt(.5, .3, .2), q ~ sqrt(.2, .3, .5)
    s = math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2)
    p2 = [math.sqrt(0.5) / s, math.sqrt(0.3) / s, math.sqrt(0.2) / s]
    q2 = p2[::-1]
    tv, accept = _losses("tv", Warp(2.0))
    assert accept.item() == pytest.approx(sum(min(a, b) for a, b in zip(p2, q2)), abs=1e-6)
    assert tv.item() == pytest.approx(1 - accept.item(), abs=1e-6)
    soft, _ = _losses("soft_ce", Warp(2.0))
    assert soft.item() == pytest.approx(-sum(a * math.log(b) for a, b in zip(p2, q2)), abs=1e-5)


def test_greedy_accepts_on_equal_argmax_and_trains_softmax_q():
    tv, accept = _losses("tv", Warp(0.0))
    assert accept.item() == 0.0  # argmax p = 0, argmax q = 2
    assert tv.item() == pytest.approx(1 - 0.2, abs=1e-6)  # 1 - softmax(q)[argmax p]
    soft, _ = _losses("soft_ce", Warp(0.0))
    assert soft.item() == pytest.approx(-math.log(0.2), abs=1e-6)  # CE to the policy's argmax
    assert draft_losses(P.log(), TOKEN, P.log(), "tv", Warp(0.0))[1].item() == 1.0


@pytest.mark.parametrize("loss_type", ["soft_ce", "tv"])
def test_policy_side_is_detached(loss_type):
    policy = P.log().requires_grad_()
    draft = Q.log().requires_grad_()
    loss, _ = draft_losses(draft, TOKEN, policy, loss_type, Warp(1.0, top_k=2))
    loss.sum().backward()
    assert policy.grad is None
    assert draft.grad.abs().sum() > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        draft_losses(Q.log(), TOKEN, P.log(), "kl")
    with pytest.raises(ValueError, match="needs the policy's logits"):
        draft_losses(Q.log(), TOKEN, None, "tv")


def test_warp_matches_the_rollout_sampler():
    from verl_mtp.rollout.sampling import SamplingParams, warp_probs as rollout_warp

    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(temperature=0.7, top_k=5, top_p=0.8), SamplingParams(temperature=0)):
        assert torch.equal(rollout_warp(logits, params),
                           warp_probs(logits, params.temperature, params.top_k, params.top_p))


def test_alignment_depth_i_at_t_is_the_policy_at_t_plus_i_plus_1():
    """input_ids = 0..T-1; a perfect policy's row s puts its mass on token s+1 and a perfect draft of
    depth i at t on token t+i+2 (its label): every depth then has hit 1 AND acceptance 1. Reading the
    policy one position off (t+i or t+i+2) would give acceptance 0."""
    t_len, vocab, depths = 8, 12, 3
    ids = torch.arange(t_len)[None]
    big = 30.0
    policy = torch.zeros(1, t_len, vocab)
    policy[0, torch.arange(t_len - 1), torch.arange(1, t_len)] = big
    drafts = []
    for i in range(depths):
        d = torch.zeros(1, t_len, vocab)
        d[0, torch.arange(t_len), (torch.arange(t_len) + i + 2) % vocab] = big
        drafts.append(d)
    _, metrics = compute_mtp_loss(drafts, ids, torch.ones_like(ids), policy_logits=policy, loss_type="tv")
    for k in range(1, depths + 1):
        assert metrics[f"mtp/acc_{k}"] == 1.0
        assert metrics[f"mtp/expected_accept_rate_{k}"] == pytest.approx(1.0, abs=1e-6)
        assert metrics[f"mtp/loss_{k}"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["mtp/expected_accept_length"] == pytest.approx(1.0 + depths, abs=1e-5)
    mask = torch.zeros(1, t_len, dtype=torch.bool)
    mask[0, 2] = True
    assert torch.equal(policy_rows(policy, mask, 1), policy[:, 4])


def test_expected_accept_length_is_the_per_position_chain():
    # two positions, two depths: a = (.8, .5) at t0 and (.4, 1.) at t1 -> 1 + mean(.8, .4) + mean(.4, .4)
    masks = [torch.tensor([[True, True]])] * 2
    accepts = [torch.tensor([[0.8, 0.4]]), torch.tensor([[0.5, 1.0]])]
    m = expected_acceptance(accepts, masks)
    assert m["mtp/expected_accept_rate_1"] == pytest.approx(0.6)
    assert m["mtp/expected_accept_rate_2"] == pytest.approx(0.75)
    assert m["mtp/expected_chain_accept_rate_1"] == pytest.approx(0.6)
    assert m["mtp/expected_chain_accept_rate_2"] == pytest.approx(0.4)  # mean(.8 * .5, .4 * 1.)
    assert m["mtp/expected_accept_length"] == pytest.approx(1 + 0.6 + 0.4)
    assert expected_acceptance(accepts, masks, chain_depth=1)["mtp/expected_accept_length"] == pytest.approx(1.6)
    # a position where depth 1 has no target does not count in the depth-2 chain
    masks = [torch.tensor([[False, True]]), torch.tensor([[True, True]])]
    accepts = [torch.tensor([[0.0, 0.4]]), torch.tensor([[0.5, 1.0]])]
    assert expected_acceptance(accepts, masks)["mtp/expected_accept_length"] == pytest.approx(1 + 0.4 + 0.4)


def test_scaling_and_masking_shared_by_every_loss_type():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (2, 6), generator=g)
    policy = torch.randn(2, 6, 7, generator=g)
    drafts = [torch.randn(2, 6, 7, generator=g) for _ in range(2)]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    for loss_type in ("ce", "soft_ce", "tv"):
        loss, metrics = compute_mtp_loss(drafts, ids, mask, scaling_factor=0.5, policy_logits=policy,
                                         loss_type=loss_type)
        per_depth = [mtp_token_losses(d, torch.cat([ids[:, i + 2:], ids[:, :i + 2] * 0], 1),
                                      torch.cat([mask[:, i + 2:], mask[:, :i + 2] * 0], 1).bool(), policy, i,
                                      loss_type)[0] for i, d in enumerate(drafts)]
        counts = [int(torch.cat([mask[:, i + 2:], mask[:, :i + 2] * 0], 1).sum()) for i in range(2)]
        ref = 0.5 * sum(pl.sum() / c for pl, c in zip(per_depth, counts)) / 2
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        assert metrics["mtp/loss_1"] == pytest.approx((per_depth[0].sum() / counts[0]).item(), rel=1e-6)


def test_expected_accept_in_chunks_equals_one_pass():
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    warp = Warp(0.8, top_k=6, top_p=0.9)
    whole = torch.minimum(warp.probs(p), warp.probs(q)).sum(-1)
    assert torch.allclose(expected_accept(p, q, warp, elements=30), whole)  # chunks of 2 rows
    assert expected_accept(p[:0], q[:0], warp).shape == (0,)
