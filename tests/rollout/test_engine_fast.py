"""The engine's inference copy (rollout.fast_model): same tokens as the model's own cached forwards,
never stale after a weight change by any route, and `rollout.dtype` honoured (bf16) or refused loudly."""

import copy

import pytest
import torch

from verl_mtp import device
from verl_mtp.algos.rollout_mismatch import rollout_mismatch_metrics
from tests.conftest import toy_config
from verl_mtp.models import MTPCausalLM
from verl_mtp.rollout import NativeEngine, SamplingParams

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15, 16], [7, 7, 7, 7, 7, 7, 7, 7, 2]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


class ModelPath:
    """The model's own cached forwards (MTPCausalLM.trunk_step / mtp_step / lm_logits): the reference path."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stale(self):
        return False


def reference_engine(model, **kw):
    engine = NativeEngine(model, **kw)
    engine.fast = ModelPath(model)
    engine.cache = model.allocate_cache(engine.max_batch_size, engine._scratch + 1)
    return engine


def _run(engine, depth, params=GREEDY):
    out = engine.generate(PROMPTS, params, speculative=depth)
    return [s.token_ids for s in out.samples], [s.logprobs for s in out.samples]


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_fast_path_matches_model_forwards(good_draft_model, depth):
    fast = NativeEngine(good_draft_model, max_batch_size=4, max_seq_len=64)
    ref = reference_engine(good_draft_model, max_batch_size=4, max_seq_len=64)
    tokens, logprobs = _run(fast, depth)
    ref_tokens, ref_logprobs = _run(ref, depth)
    assert tokens == ref_tokens
    assert torch.allclose(torch.tensor(sum(logprobs, [])), torch.tensor(sum(ref_logprobs, [])), atol=1e-5)


def test_fast_path_moe_and_biases_match_model_forwards():
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                   o_bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # make logits far from uniform, so ties cannot hide a bug
    tokens, logprobs = _run(NativeEngine(model, max_batch_size=4, max_seq_len=64), 2)
    ref_tokens, ref_logprobs = _run(reference_engine(model, max_batch_size=4, max_seq_len=64), 2)
    assert tokens == ref_tokens
    assert torch.allclose(torch.tensor(sum(logprobs, [])), torch.tensor(sum(ref_logprobs, [])), atol=1e-5)


def test_weights_changed_in_place_are_seen(good_draft_model, bad_draft_model):
    """An optimizer step on a model the engine shares (evaluation during training) changes its tensors
    in place: the next generation uses the new weights, as a fresh engine would."""
    model = copy.deepcopy(bad_draft_model)
    engine = NativeEngine(model, max_batch_size=4, max_seq_len=64)
    before = _run(engine, 2)
    with torch.no_grad():
        for p, new in zip(model.parameters(), good_draft_model.parameters()):
            p.copy_(new)
    after = _run(engine, 2)
    fresh = _run(NativeEngine(copy.deepcopy(good_draft_model), max_batch_size=4, max_seq_len=64), 2)
    assert after == fresh and after != before


def test_update_weights_refreshes_the_fused_copy(good_draft_model, bad_draft_model):
    engine = NativeEngine(copy.deepcopy(bad_draft_model), max_batch_size=4, max_seq_len=64)
    engine.update_weights(good_draft_model.state_dict().items())
    assert not engine.fast.stale()
    blk = engine.fast.blocks[0]
    attn = good_draft_model.model.layers[0].self_attn
    assert torch.equal(blk.w_qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert _run(engine, 2) == _run(NativeEngine(copy.deepcopy(good_draft_model), max_batch_size=4, max_seq_len=64), 2)


@pytest.mark.skipif(not device.bf16_native(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_rollout_close_to_fp32(good_draft_model):
    bf16 = NativeEngine(good_draft_model, max_batch_size=4, max_seq_len=64, dtype="bfloat16")
    assert bf16.dtype == bf16.cache.k.dtype == bf16.fast.blocks[0].w_qkv.dtype == torch.bfloat16
    assert good_draft_model.lm_head.weight.dtype == torch.float32  # the canonical weights are untouched
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=3)
    fp32_engine = NativeEngine(good_draft_model, max_batch_size=4, max_seq_len=64)
    mismatch = {}
    for name, engine in (("bf16", bf16), ("fp32", fp32_engine)):
        # the behaviour log-probs of the samples vs the fp32 model's rescoring (what the trainer does)
        tokens, logprobs = _run(engine, 2, params)
        rescored = []
        for prompt, toks in zip(PROMPTS, tokens):
            with torch.no_grad():
                logits = good_draft_model(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:-1]
            rescored.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks)[:, None]).squeeze(-1))
        flat = torch.tensor(sum(logprobs, []))[None]
        mismatch[name] = rollout_mismatch_metrics(flat, torch.cat(rescored)[None], torch.ones_like(flat))
    assert mismatch["fp32"]["training/rollout_probs_diff_max"] < 1e-5
    assert 0 < mismatch["bf16"]["training/rollout_probs_diff_mean"] < 0.02
    assert mismatch["bf16"]["training/rollout_probs_diff_max"] < 0.1
    assert mismatch["bf16"]["training/rollout_actor_probs_pearson_corr"] > 0.99
    fp32_tokens, _ = _run(fp32_engine, 2)
    assert _run(bf16, 2)[0] == fp32_tokens  # greedy: this confident toy model's argmax survives bf16


def test_unsupported_dtype_falls_back_with_one_warning(good_draft_model, monkeypatch, capsys):
    """Training's dtype rule (verl_mtp.device.native_dtype): one stderr line naming the key, once."""
    monkeypatch.setattr(device, "bf16_native", lambda device: False)
    monkeypatch.setattr(device, "_warned", set())
    engines = [NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=32, dtype="bfloat16") for _ in range(2)]
    assert all(e.dtype == torch.float32 for e in engines)
    assert capsys.readouterr().err.splitlines() == [
        "verl-mtp: warning: rollout.dtype=bfloat16 is not honoured on this cpu (no native bfloat16): computing in float32"]
    with pytest.raises(ValueError, match="rollout.dtype='int8'"):
        NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=32, dtype="int8")
