"""PolicyActor on the torch engine: log-probs, gradient accumulation, and the detached MTP loss."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from verl_mtp.batch import from_samples
from verl_mtp.config import load_config
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config


def _cfg(**over):
    args = [f"{k}={v}" for k, v in over.items()]
    return load_config(["actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.optim.clip_grad=1e9",
                        "actor_rollout_ref.model.mtp.num_layers=2", *args]).actor_rollout_ref


def _batch(seed=0, rows=6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 24, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    responses = [torch.randint(1, 24, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(rows)]
    b = from_samples(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0,
                     meta={"uid": [i // 2 for i in range(rows)]})
    adv = torch.randn(b.responses.shape, generator=g) * b.response_mask
    return b.with_(advantages=adv)


def _actor(model, arr, num_mtp=2, detach=True):
    optim = OmegaConf.to_container(arr.actor.optim)
    engine = build_engine("torch", model=model, optim=optim, total_steps=10, num_mtp=num_mtp, mtp_detach=detach)
    return PolicyActor(engine, arr, temperature=1.0)


def test_log_probs_match_full_forward():
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config())
    actor = _actor(model, _cfg())
    b = _batch()
    lp, ent = actor.compute_log_probs(b, micro_size=4, entropy=True)
    for i in range(len(b)):
        p = b.prompts[i][b.prompt_mask[i].bool()].tolist()
        r = b.responses[i][b.response_mask[i].bool()].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        assert torch.allclose(lp[i, : len(r)], ref, atol=1e-5)
        assert torch.all(ent[i, : len(r)] > 0)


def _capture_grads(actor):
    """Replace the optimizer step by a recorder: Adam's first step is ~lr*sign(g), so comparing
    updated weights would amplify rounding noise; the accumulated gradients are what must agree."""
    grads = []

    def step():
        grads.append({n: p.grad.clone() for n, p in actor.engine.module.named_parameters() if p.grad is not None})
        actor.engine.optimizer.zero_grad(set_to_none=True)
        return {"actor/grad_norm": 1.0}

    actor.engine.optimizer_step = step
    return grads


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(mode):
    torch.manual_seed(0)
    base = MTPCausalLM(toy_config())
    b = _batch()
    results = []
    for micro in (16, 2):  # one micro-batch vs three: the same gradient
        arr = _cfg(**{"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": micro,
                      "actor_rollout_ref.actor.loss_agg_mode": mode})
        actor = _actor(copy.deepcopy(base), arr)
        grads = _capture_grads(actor)
        old = actor.compute_log_probs(b)[0]
        metrics = actor.update_policy(b.with_(old_log_probs=old), mini_batch_rows=6)
        results.append((grads[0], metrics))
    (g1, m1), (g2, m2) = results
    assert g1.keys() == g2.keys() and any(".mtp_layers." in n for n in g1)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6), name
    assert abs(m1["actor/pg_loss"] - m2["actor/pg_loss"]) < 1e-6
    assert abs(m1["mtp/loss"] - m2["mtp/loss"]) < 1e-6


@pytest.mark.parametrize("detach", [True, False])
def test_with_zero_advantage_only_mtp_layers_learn_when_detached(detach):
    """slime's check: policy loss zero, MTP loss on: with detach only `.mtp_layers.` parameters move."""
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config())
    before = copy.deepcopy(model.state_dict())
    actor = _actor(model, _cfg(), detach=detach)
    b = _batch()
    old = actor.compute_log_probs(b)[0]
    metrics = actor.update_policy(b.with_(old_log_probs=old, advantages=torch.zeros_like(b.advantages)), 6)
    assert metrics["mtp/loss"] > 0 and abs(metrics["actor/pg_loss"]) < 1e-9
    moved = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert any(".mtp_layers." in n for n in moved)
    trunk_moved = {n for n in moved if ".mtp_layers." not in n}
    assert (not trunk_moved) if detach else trunk_moved


def test_nan_loss_skips_the_update():
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config())
    before = copy.deepcopy(model.state_dict())
    actor = _actor(model, _cfg())
    b = _batch()
    old = actor.compute_log_probs(b)[0]
    bad = b.advantages.clone()
    bad[0, 0] = float("nan")
    metrics = actor.update_policy(b.with_(old_log_probs=old, advantages=bad), 6)
    assert metrics["actor/nan_skipped_updates"] == 1.0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_unknown_strategy_is_a_one_line_error():
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.strategy='jax'"):
        build_engine("jax")


def test_detached_mtp_gradient_does_not_shrink_the_policy_update():
    """Clipping trunk and MTP layers separately: a huge MTP loss leaves the trunk's step unchanged."""
    torch.manual_seed(0)
    base = MTPCausalLM(toy_config())
    b = _batch()
    trunk_after = []
    for scale in (0.1, 1000.0):
        arr = _cfg(**{"actor_rollout_ref.actor.optim.clip_grad": 1.0,
                      "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor": scale})
        model = copy.deepcopy(base)
        actor = _actor(model, arr, detach=True)
        old = actor.compute_log_probs(b)[0]
        actor.update_policy(b.with_(old_log_probs=old), 6)
        trunk_after.append({n: t.clone() for n, t in model.state_dict().items() if ".mtp_layers." not in n})
    assert all(torch.equal(trunk_after[0][n], trunk_after[1][n]) for n in trunk_after[0])


def test_on_policy_step_without_old_log_probs_equals_the_recomputed_ratio():
    """One epoch, one mini-batch: the update's own detached log-probs stand in for a separate
    old-log-prob pass (the trainer skips that pass); gradient and metrics must be the recomputed ones."""
    torch.manual_seed(0)
    base = MTPCausalLM(toy_config())
    b = _batch()
    arr = _cfg(**{"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 2})
    results = []
    for recompute in (True, False):
        actor = _actor(copy.deepcopy(base), arr)
        grads = _capture_grads(actor)
        batch = b.with_(old_log_probs=actor.compute_log_probs(b)[0]) if recompute else b
        metrics = actor.update_policy(batch, mini_batch_rows=6)
        results.append((grads[0], metrics))
    (g1, m1), (g2, m2) = results
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6), name
    assert m2["actor/ppo_kl"] == 0.0 and m2["actor/pg_clipfrac"] == 0.0
    for key in ("actor/pg_loss", "actor/ppo_kl", "mtp/loss", "actor/entropy"):
        assert abs(m1[key] - m2[key]) < 1e-6, key
