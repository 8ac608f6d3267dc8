"""PolicyActor's verl semantics: Dr.GRPO's constant horizon, sequences without response tokens, and a
mini-batch order that is reshuffled every step (and replayed on resume)."""

import pytest
import torch
from omegaconf import OmegaConf

from verl_mtp.batch import from_samples
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config
from tests.engines.test_engines_actor import _actor, _batch, _capture_grads, _cfg


def _rows(response_lengths, advantages):
    """Prompts of 3 tokens; response i has response_lengths[i] tokens, each with advantage advantages[i]."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 24, (3,), generator=g).tolist() for _ in response_lengths]
    responses = [torch.randint(1, 24, (n,), generator=g).tolist() for n in response_lengths]
    b = from_samples(prompts, responses, [[0.0] * n for n in response_lengths], pad_id=0,
                     meta={"uid": list(range(len(response_lengths)))})
    return b.with_(advantages=torch.tensor(advantages)[:, None] * b.response_mask)


def _pg_loss(batch, max_response_length=None, **over):
    torch.manual_seed(0)
    arr = _cfg(**over)
    engine = build_engine("torch", model=MTPCausalLM(toy_config()), optim=OmegaConf.to_container(arr.actor.optim),
                          total_steps=10, num_mtp=2, mtp_detach=True)
    actor = PolicyActor(engine, arr, temperature=1.0, max_response_length=max_response_length)
    return actor.update_policy(batch, mini_batch_rows=len(batch))["actor/pg_loss"]


def test_dr_grpo_divides_by_max_response_length_whatever_the_padding():
    # on-policy (no old log-probs): every ratio is 1, so each token's loss is -A
    mode = {"actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-sum-norm"}
    narrow = _rows([2, 3], [1.0, -0.5])
    wide = _rows([2, 3, 9], [1.0, -0.5, 0.0])  # padded to 9 columns; the extra row adds no loss
    expected = -(2 * 1.0 + 3 * -0.5) / 16  # summed over sequences, / data.max_response_length = 16
    assert _pg_loss(narrow, 16, **mode) == pytest.approx(expected)
    assert _pg_loss(wide, 16, **mode) == pytest.approx(expected)
    # verl's actor.loss_scale_factor overrides the horizon
    assert _pg_loss(wide, 16, **mode, **{"actor_rollout_ref.actor.loss_scale_factor": 4}) == pytest.approx(
        -(2 * 1.0 + 3 * -0.5) / 4)


@pytest.mark.parametrize("mode, per_row", [("seq-mean-token-mean", lambda n, a: -a),
                                           ("seq-mean-token-sum", lambda n, a: -a * n)])
def test_a_row_without_response_tokens_is_not_a_sequence(mode, per_row):
    batch = _rows([2, 3, 4], [1.0, -0.5, 2.0])
    mask = batch.response_mask.clone()
    mask[2] = 0  # e.g. a response cut away entirely
    batch = batch.with_(response_mask=mask, advantages=batch.advantages * mask)
    expected = (per_row(2, 1.0) + per_row(3, -0.5)) / 2  # two sequences, not three
    assert _pg_loss(batch, **{"actor_rollout_ref.actor.loss_agg_mode": mode}) == pytest.approx(expected)


def _first_step_grads(step, shuffle=True):
    torch.manual_seed(0)
    actor = _actor(MTPCausalLM(toy_config()), _cfg(**{"actor_rollout_ref.actor.shuffle": shuffle}))
    grads = _capture_grads(actor)
    actor.update_policy(_batch(rows=8), mini_batch_rows=4, step=step)
    return grads[0]


def test_shuffle_draws_a_new_mini_batch_order_each_step_and_replays_it():
    first, again, later = _first_step_grads(1), _first_step_grads(1), _first_step_grads(2)
    name = next(iter(first))
    assert torch.equal(first[name], again[name])  # a resumed run at step 1 takes the same order
    assert not torch.allclose(first[name], later[name])  # step 2: another first mini-batch
    unshuffled = _first_step_grads(1, shuffle=False), _first_step_grads(2, shuffle=False)
    assert torch.equal(unshuffled[0][name], unshuffled[1][name])
