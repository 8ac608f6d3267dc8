"""PolicyActor's MTP side on the torch engine: the loss types, the expected-acceptance metrics of every
update, and log-prob passes that run the trunk only."""

import pytest
import torch

import verl_mtp.engines.actor as actor_module
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config
from tests.engines.test_engines_actor import _actor, _batch, _cfg


def _calls(module_list):
    """Count forward calls of each module in `module_list` with hooks; returns the live counter list."""
    counts = [0] * len(module_list)
    for i, m in enumerate(module_list):
        m.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_log_prob_pass_runs_no_mtp_layer_and_no_entropy(monkeypatch):
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config())
    actor = _actor(model, _cfg())
    mtp_calls = _calls(model.model.mtp_layers)
    entropies = []
    monkeypatch.setattr(actor_module, "entropy_from_logits",
                        lambda logits: entropies.append(1) or torch.zeros(logits.shape[0]))
    b = _batch()
    log_probs, entropy = actor.compute_log_probs(b, micro_size=2)
    assert mtp_calls == [0, 0] and entropy is None and not entropies
    assert actor.compute_log_probs(b, entropy=True)[1] is not None and entropies
    actor.update_policy(b.with_(old_log_probs=log_probs), mini_batch_rows=len(b))  # training runs them all
    assert mtp_calls == [1, 1]


@pytest.mark.parametrize("loss_type", ["ce", "soft_ce", "tv"])
def test_every_update_reports_expected_acceptance(loss_type):
    torch.manual_seed(0)
    actor = _actor(MTPCausalLM(toy_config()), _cfg(**{"actor_rollout_ref.model.mtp.loss_type": loss_type,
                                                       "actor_rollout_ref.model.mtp.speculative_num_steps": 1}))
    m = actor.update_policy(_batch(), mini_batch_rows=3)
    for k in (1, 2):
        assert 0 < m[f"mtp/expected_accept_rate_{k}"] <= 1
    # a chain of depth 1 (speculative_num_steps=1): one bonus token plus depth 1's acceptance
    assert m["mtp/expected_accept_length"] == pytest.approx(1 + m["mtp/expected_accept_rate_1"], abs=1e-6)
    if loss_type == "tv":  # the loss is one minus the expected acceptance, position by position
        assert m["mtp/loss_1"] == pytest.approx(1 - m["mtp/expected_accept_rate_1"], abs=1e-5)


@pytest.mark.parametrize("loss_type", ["soft_ce", "tv"])
def test_soft_objectives_train_only_the_mtp_layers_towards_the_policy(loss_type):
    """With the policy loss at zero (zero advantages, no entropy bonus) a detached soft/TV loss changes
    only `.mtp_layers.` and raises the draft's expected acceptance against the (unchanged) policy."""
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config())
    actor = _actor(model, _cfg(**{"actor_rollout_ref.model.mtp.loss_type": loss_type,
                                  "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor": 1.0,
                                  "actor_rollout_ref.rollout.top_k": 5}))
    b = _batch(rows=8)
    b = b.with_(advantages=torch.zeros_like(b.advantages))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rates = [actor.update_policy(b, mini_batch_rows=8)["mtp/expected_accept_rate_1"] for _ in range(15)]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (".mtp_layers." in name), name
    assert rates[-1] > rates[0] + 0.05, rates
