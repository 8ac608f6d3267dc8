"""The MoE FFN: dispatch against a per-token loop, the load-balancing loss by hand, padding, gradients,
MoE in MTP layers or not, HF-folder round trip, the rollout engine's greedy speculation, actor metrics."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from verl_mtp.batch import from_samples
from verl_mtp.config import load_config
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.models.moe import MoE, Routing, load_balance, moe_metrics
from verl_mtp.models.mtp_model import padding_causal_mask, rope_cos_sin
from verl_mtp.models.toy import fit_markov
from verl_mtp.rollout import NativeEngine, SamplingParams
from tests.conftest import toy_config

MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16)
MOE_KEYS = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
            "router_aux_loss_coef", "first_k_dense_replace", "moe_in_mtp", "norm_topk_prob")


def _moe_model(seed=0, **kw) -> MTPCausalLM:
    torch.manual_seed(seed)
    return MTPCausalLM(toy_config(**{**MOE, **kw}))


def _ids(rows=3, length=11, seed=0):
    return torch.randint(0, 24, (rows, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the block


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("shared", [0, 2])
def test_dispatch_equals_a_per_token_loop(norm_topk_prob, shared):
    torch.manual_seed(0)
    moe = MoE(hidden_size=8, num_experts=5, top_k=2, intermediate_size=6, num_shared=shared,
              norm_topk_prob=norm_topk_prob)
    x = torch.randn(3, 7, 8)
    out = moe(x)
    for token, y in zip(x.reshape(-1, 8), out.reshape(-1, 8)):
        probs = torch.softmax(moe.gate(token), -1)
        weights, experts = probs.topk(2)
        if norm_topk_prob:
            weights = weights / weights.sum()
        ref = sum(w * moe.experts[int(e)](token) for w, e in zip(weights, experts))
        if shared:
            ref = ref + moe.shared_experts(token)
        assert torch.allclose(y, ref, atol=1e-6)


def test_balance_loss_by_hand():
    """E=3, top-1, four tokens: f = (2, 1, 1)/4, P = column means, loss = 3 * sum f P = 1.05; with the
    last token as padding f = (2, 1, 0)/3, P over three tokens, loss = 3 * 4.1 / 9."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    chosen = torch.zeros(4, 3, dtype=torch.bool).scatter_(1, probs.argmax(-1, keepdim=True), True)
    full = load_balance(probs, chosen, torch.ones(4, dtype=torch.bool), top_k=1)
    assert float(full.balance_loss) == pytest.approx(1.05)
    assert full.load.tolist() == pytest.approx([0.5, 0.25, 0.25])
    padded = load_balance(probs, chosen, torch.tensor([True, True, True, False]), top_k=1)
    assert float(padded.balance_loss) == pytest.approx(3 * 4.1 / 9)
    assert padded.load.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    # the same numbers through the block: identity router on inputs log(p) gives router probs p
    moe = MoE(hidden_size=3, num_experts=3, top_k=1, intermediate_size=4)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(3))
    routing = Routing(valid=torch.tensor([[True, True, True, False]]))
    moe(probs.log()[None], routing)
    assert float(routing.records[0].balance_loss.detach()) == pytest.approx(3 * 4.1 / 9)


def test_balance_loss_is_one_when_uniform_and_e_over_k_when_collapsed():
    n, e, k = 12, 4, 2
    uniform = torch.full((n, e), 1 / e)
    chosen = torch.zeros(n, e, dtype=torch.bool)
    for t in range(n):  # round robin over the experts
        chosen[t, [(2 * t) % e, (2 * t + 1) % e]] = True
    assert float(load_balance(uniform, chosen, torch.ones(n, dtype=torch.bool), k).balance_loss) == pytest.approx(1.0)
    collapsed = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(n, e)
    chosen = collapsed > 0
    record = load_balance(collapsed, chosen, torch.ones(n, dtype=torch.bool), k)
    assert float(record.balance_loss) == pytest.approx(e / k)
    metrics = moe_metrics(torch.tensor(0.5), record.load[None])
    assert metrics["moe/balance"] == pytest.approx(e / k) and metrics["moe/expert_load_3"] == 0.0


# ---------------------------------------------------------------- the model


def test_forward_shapes_aux_loss_and_loads():
    model = _moe_model(first_k_dense_replace=1)
    out = model(_ids())
    v = model.config.vocab_size
    assert out.logits.shape == (3, 11, v) and [m.shape for m in out.mtp_logits] == [(3, 11, v)] * 2
    assert out.moe_stats.shape == (1 + 2, 4)  # trunk layer 1, then both MTP layers
    assert torch.allclose(out.moe_stats.sum(-1), torch.ones(3))
    assert out.aux_loss.dim() == 0 and float(out.aux_loss) > 0
    assert model(_ids(), num_mtp=0).moe_stats.shape == (1, 4)


def test_aux_loss_is_the_coefficient_times_the_sum_over_layers():
    model = _moe_model(router_aux_loss_coef=0.25)
    ids = _ids()
    routing = Routing(valid=torch.ones_like(ids, dtype=torch.bool))
    out = model(ids, num_mtp=0)
    emb = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(torch.arange(11).expand(3, 11), model.model.inv_freq, emb.dtype)
    h = emb
    for layer in model.model.layers:
        h = layer(h, cos, sin, padding_causal_mask(torch.ones_like(ids)), routing=routing)
    assert len(routing.records) == 2
    expected = 0.25 * sum(float(r.balance_loss) for r in routing.records)
    assert float(out.aux_loss) == pytest.approx(expected, rel=1e-6)


def test_dense_models_are_untouched():
    torch.manual_seed(0)
    dense = MTPCausalLM(toy_config())
    out = dense(_ids())
    assert out.moe_stats is None and float(out.aux_loss) == 0.0
    assert not any(".experts." in n or ".gate.weight" in n for n in dense.state_dict())
    assert not set(dense.config.to_hf_dict()) & {"n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"}


def test_padding_counts_neither_in_the_loss_nor_in_the_loads():
    model = _moe_model().eval()
    real = _ids(rows=1, length=7)
    alone = model(real)
    pads = torch.randint(0, 24, (1, 4))  # whatever the pad ids are
    padded_ids = torch.cat([pads, real], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    padded = model(padded_ids, attention_mask=mask)
    assert torch.allclose(padded.moe_stats, alone.moe_stats, atol=1e-6)
    assert float(padded.aux_loss) == pytest.approx(float(alone.aux_loss), rel=1e-5)
    other_pads = model(torch.cat([pads.flip(1), real], dim=1), attention_mask=mask)
    assert torch.equal(other_pads.moe_stats, padded.moe_stats)


def test_gradients_reach_routers_experts_and_shared_experts():
    model = _moe_model()
    ids = _ids()
    out = model(ids)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (ce + out.aux_loss + sum(m.mean() for m in out.mtp_logits)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())  # every expert ran, even on no tokens
    for prefix in ("model.layers.0.mlp", "model.layers.1.mlp", "model.mtp_layers.0.mlp", "model.mtp_layers.1.mlp"):
        assert grads[f"{prefix}.gate.weight"].abs().sum() > 0
        assert grads[f"{prefix}.shared_experts.up_proj.weight"].abs().sum() > 0
        assert sum(float(grads[f"{prefix}.experts.{j}.down_proj.weight"].abs().sum()) > 0 for j in range(4)) >= 2
    model.zero_grad()
    model(ids).aux_loss.backward()  # the balance loss alone trains the routers
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("moe_in_mtp", [True, False])
def test_moe_in_mtp_layers_or_not(moe_in_mtp):
    model = _moe_model(moe_in_mtp=moe_in_mtp, first_k_dense_replace=1)
    names = set(model.state_dict())
    assert "model.layers.0.mlp.gate_proj.weight" in names  # below first_k_dense_replace: dense
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    assert ("model.mtp_layers.1.mlp.experts.0.up_proj.weight" in names) == moe_in_mtp
    assert ("model.mtp_layers.1.mlp.up_proj.weight" in names) != moe_in_mtp
    assert model(_ids()).moe_stats.shape[0] == 1 + (2 if moe_in_mtp else 0)


def test_detached_mtp_layers_balance_loss_never_reaches_the_trunk():
    model = _moe_model(first_k_dense_replace=2)  # a dense trunk: every balance loss comes from MTP layers
    model(_ids(), mtp_detach=True).aux_loss.backward()
    learning = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"model.mtp_layers.0.mlp.gate.weight", "model.mtp_layers.1.mlp.gate.weight"} <= learning
    assert all(".mtp_layers." in n for n in learning)


def test_bf16_autocast_and_bf16_weights_route_in_float32():
    model = _moe_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_ids())
    assert out.logits.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32
    (out.logits.float().mean() + out.aux_loss).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert model.to(torch.bfloat16)(_ids()).moe_stats.dtype == torch.float32


def test_active_parameters_count_top_k_of_the_routed_experts():
    model = _moe_model(first_k_dense_replace=1)
    expert = sum(p.numel() for p in model.model.layers[1].mlp.experts[0].parameters())
    moe_layers = 1 + 2
    assert model.num_parameters() - model.num_parameters(active=True) == moe_layers * expert * (4 - 2)


def test_config_fields_validate_and_round_trip():
    cfg = ModelConfig(**{**MOE, "first_k_dense_replace": 1, "moe_in_mtp": False, "norm_topk_prob": False})
    back = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    for key in MOE_KEYS:
        assert getattr(back, key) == getattr(cfg, key), key
    assert ModelConfig(n_routed_experts=4).moe_intermediate_size == ModelConfig().intermediate_size
    assert ModelConfig(n_routed_experts=None, n_shared_experts=None).is_moe is False  # DeepSeek's null
    for bad in ({"num_experts_per_tok": 5}, {"first_k_dense_replace": 9}, {"mlp_bias": True},
                {"router_aux_loss_coef": -1.0}):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=f"'{key}'"):
            ModelConfig(**{**MOE, **bad})


def test_hf_folder_round_trip_is_bitwise(tmp_path):
    model = _moe_model(first_k_dense_replace=1, router_aux_loss_coef=0.01).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert [cfg[k] for k in MOE_KEYS] == [4, 2, 1, 16, 0.01, 1, True, True]
    back = MTPCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.is_moe and list(back.state_dict()) == list(model.state_dict())
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in model.state_dict().items())
    ids = _ids()
    a, b = model(ids), back(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aux_loss, b.aux_loss)
    # DeepSeek-V3 / Qwen2-MoE tensor names
    for name in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.2.down_proj.weight",
                 "model.layers.1.mlp.shared_experts.gate_proj.weight",
                 "model.mtp_layers.0.mlp.experts.0.up_proj.weight"):
        assert name in back.state_dict()


def test_fresh_mtp_layers_copy_the_last_trunk_block_where_the_ffn_kinds_match(tmp_path):
    _moe_model(num_nextn_predict_layers=0).save_pretrained(tmp_path)
    state = MTPCausalLM.from_pretrained(tmp_path, num_mtp_layers=1, init_mtp_from="last_layer").state_dict()
    for part in ("self_attn.q_proj.weight", "mlp.gate.weight", "mlp.experts.3.up_proj.weight"):
        assert torch.equal(state[f"model.mtp_layers.0.{part}"], state[f"model.layers.1.{part}"])
    # dense MTP layers under a MoE trunk: attention is copied, the FFN keeps its fresh init
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "moe_in_mtp": False}))
    state = MTPCausalLM.from_pretrained(tmp_path, num_mtp_layers=1, init_mtp_from="last_layer").state_dict()
    q = "self_attn.q_proj.weight"
    assert torch.equal(state[f"model.mtp_layers.0.{q}"], state[f"model.layers.1.{q}"])
    assert state["model.mtp_layers.0.mlp.up_proj.weight"].shape == (64, 32)


# ---------------------------------------------------------------- rollout engine and actor


@pytest.fixture(scope="module")
def trained_moe():
    torch.manual_seed(0)
    model, _ = fit_markov(MTPCausalLM(toy_config(**MOE)), steps=100, seq_len=24)
    return model.eval()


@pytest.mark.parametrize("depth", [1, 3])
def test_engine_greedy_speculative_equals_plain_with_moe(trained_moe, depth):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15, 16]]
    engine = NativeEngine(trained_moe, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    plain = engine.generate(prompts, params, speculative=0)
    spec = engine.generate(prompts, params, speculative=depth)
    assert [s.token_ids for s in spec.samples] == [s.token_ids for s in plain.samples]
    assert spec.stats.accept_length > 1.3  # the MoE MTP layers really drafted and were kept


def test_engine_logprobs_equal_the_teacher_forced_forward_with_moe(trained_moe):
    engine = NativeEngine(trained_moe, max_batch_size=2, max_seq_len=64)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=0), speculative=2)
    for s in out.samples:
        prompt = prompts[s.prompt_index]
        with torch.no_grad():
            logits = trained_moe(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4)


def _actor_batch(rows=6, seed=0, zero_advantages=False):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 24, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    responses = [torch.randint(1, 24, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(rows)]
    b = from_samples(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0)
    adv = torch.zeros(b.responses.shape) if zero_advantages else torch.randn(b.responses.shape, generator=g)
    return b.with_(advantages=adv * b.response_mask)


def _update(model, batch, num_mtp=2):
    arr = load_config(["actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.optim.clip_grad=1e9",
                       "actor_rollout_ref.model.mtp.num_layers=2",
                       "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]).actor_rollout_ref
    engine = build_engine("torch", model=model, optim=OmegaConf.to_container(arr.actor.optim), total_steps=10,
                          num_mtp=num_mtp, mtp_detach=True)
    actor = PolicyActor(engine, arr)
    grads = {}
    step = engine.optimizer_step

    def record_then_step():
        grads.update({n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return step()

    engine.optimizer_step = record_then_step
    log_probs, _ = actor.compute_log_probs(batch)
    return actor.update_policy(batch.with_(old_log_probs=log_probs), mini_batch_rows=len(batch)), grads


def test_actor_trains_the_aux_loss_and_logs_moe_metrics():
    metrics, _ = _update(_moe_model(), _actor_batch())
    assert metrics["moe/aux_loss"] > 0 and 1.0 <= metrics["moe/balance"] <= 4 / 2
    loads = [metrics[f"moe/expert_load_{i}"] for i in range(4)]
    assert sum(loads) == pytest.approx(1.0) and "moe/expert_load_4" not in metrics
    # zero advantages, no MTP loss: the load-balancing loss is the only thing with a gradient
    _, grads = _update(_moe_model(), _actor_batch(zero_advantages=True), num_mtp=0)
    learning = {n for n, g in grads.items() if g.abs().max() > 0}
    assert "model.layers.0.mlp.gate.weight" in learning and "lm_head.weight" not in learning
    dense_metrics, _ = _update(MTPCausalLM(toy_config()), _actor_batch())
    assert not any(k.startswith("moe/") for k in dense_metrics)
    assert math.isfinite(dense_metrics["actor/pg_loss"])
