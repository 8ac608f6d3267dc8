"""The native engine: greedy equality, distributional losslessness (with a lossy control), logprobs,
continuous batching, stop conditions, stats, adaptive depth and verified weight sync."""

import collections
import copy
import time

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

import verl_mtp.rollout.engine as engine_module
from verl_mtp.models import MTPCausalLM
from verl_mtp.rollout import NativeEngine, SamplingParams
from verl_mtp.rollout import sampling

RAGGED = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15, 16], [7, 7, 7, 7, 7, 7, 7, 7, 2]]


def _tokens(out):
    return [s.token_ids for s in out.samples]


@pytest.mark.parametrize("max_batch_size", [1, 4, 64])
@pytest.mark.parametrize("depth", [1, 2, 3, 5, "auto"])
def test_greedy_speculative_equals_plain(good_draft_model, max_batch_size, depth):
    engine = NativeEngine(good_draft_model, max_batch_size=max_batch_size, max_seq_len=64)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    prompts = RAGGED if max_batch_size > 1 else RAGGED[:2]
    plain = engine.generate(prompts, params, speculative=0)
    spec = engine.generate(prompts, params, speculative=depth)
    assert _tokens(spec) == _tokens(plain)
    if depth != "auto":
        assert spec.stats.accept_length > 1.5  # speculation really ran and drafts were kept


def test_greedy_equality_with_rejections(bad_draft_model):
    engine = NativeEngine(bad_draft_model, max_batch_size=4, max_seq_len=64)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    plain, spec = engine.generate(RAGGED, params, speculative=0), engine.generate(RAGGED, params, speculative=3)
    assert _tokens(spec) == _tokens(plain)
    assert spec.stats.accept_rate(1) < 0.9  # rejections (and roll-backs) really happened


def test_greedy_matches_full_forward_argmax(good_draft_model):
    engine = NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=64)
    out = engine.generate(RAGGED[:3], SamplingParams(temperature=0, max_new_tokens=16), speculative=2)
    for prompt, s in zip(RAGGED, out.samples):
        with torch.no_grad():
            logits = good_draft_model(torch.tensor([prompt + s.token_ids])).logits[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == s.token_ids


def _lossy_accept(p, q, draft, greedy, gen):
    """Deliberately wrong: on rejection resample from p instead of norm(max(0, p - q))."""
    accepted, nxt = sampling.speculative_accept(p, q, draft, greedy, gen)
    rows = torch.arange(p.shape[0])
    return accepted, torch.where(accepted < draft.shape[1], sampling.sample(p[rows, accepted], gen), nxt)


def _first_tokens(engine, depth, seed, n=3000):
    params = SamplingParams(n=n, temperature=1.0, top_k=8, top_p=0.95, max_new_tokens=3, seed=seed)
    out = engine.generate([[3, 5]], params, speculative=depth)
    return collections.Counter(tuple(s.token_ids) for s in out.samples), out.stats


def _chi2_pvalue(a, b):
    keys = sorted(set(a) | set(b))
    table = np.array([[a[k] for k in keys], [b[k] for k in keys]])
    big = table.sum(0) >= 10
    table = np.concatenate([table[:, big], table[:, ~big].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]  # the pooled rare column may be empty
    return chi2_contingency(table)[1]


def test_sampled_distribution_is_lossless_and_test_has_teeth(bad_draft_model, monkeypatch):
    engine = NativeEngine(bad_draft_model, max_batch_size=64, max_seq_len=32)
    plain, _ = _first_tokens(engine, 0, seed=0)
    spec, stats = _first_tokens(engine, 2, seed=1)
    assert 0.1 < stats.accept_rate(1) < 0.9  # both branches of the rule are exercised
    assert _chi2_pvalue(plain, spec) > 1e-3
    monkeypatch.setattr(engine_module, "speculative_accept", _lossy_accept)
    lossy, _ = _first_tokens(engine, 2, seed=1)
    assert _chi2_pvalue(plain, lossy) < 1e-6


def test_sampled_distribution_with_good_draft(good_draft_model):
    engine = NativeEngine(good_draft_model, max_batch_size=64, max_seq_len=32)
    plain, _ = _first_tokens(engine, 0, seed=2)
    spec, stats = _first_tokens(engine, 3, seed=3)
    assert stats.accept_length > 2.0
    assert _chi2_pvalue(plain, spec) > 1e-3


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_logprobs_equal_teacher_forced_forward(bad_draft_model, depth):
    engine = NativeEngine(bad_draft_model, max_batch_size=3, max_seq_len=64)
    params = SamplingParams(n=2, temperature=0.7, max_new_tokens=20, seed=4)
    out = engine.generate(RAGGED[:4], params, speculative=depth)
    assert len(out.samples) == 8
    for s in out.samples:
        prompt = RAGGED[s.prompt_index]
        with torch.no_grad():
            logits = bad_draft_model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-4)


def test_stop_tokens_length_and_continuous_batching(good_draft_model):
    engine = NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=64)
    plain = engine.generate(RAGGED, SamplingParams(temperature=0, max_new_tokens=12), speculative=0)
    stop = plain.samples[0].token_ids[4]
    out = engine.generate(RAGGED, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop]), speculative=3)
    for p, s in zip(plain.samples, out.samples):
        if stop in p.token_ids:
            cut = p.token_ids.index(stop) + 1
            assert s.token_ids == p.token_ids[:cut] and s.finish_reason == "stop"
        else:
            assert s.token_ids == p.token_ids and s.finish_reason == "length" and len(s.token_ids) == 12
    assert [s.prompt_index for s in out.samples] == list(range(len(RAGGED)))


def test_engines_stepped_round_by_round_side_by_side_generate_what_each_generates_alone(good_draft_model):
    """`NativeEngine.rounds` yields once per round, so the eval can time engines side by side
    (`evaluate.side_by_side`): each arm's output is its own `generate`'s, each arm's time is its own
    rounds'; one engine runs one generation at a time."""
    from verl_mtp.trainer.evaluate import side_by_side

    params = SamplingParams(temperature=0, max_new_tokens=12)
    alone = {d: NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=64).generate(RAGGED, params, speculative=d)
             for d in (0, 3)}
    engines = {d: NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=64) for d in (0, 3, "auto")}
    t0 = time.perf_counter()
    timed = side_by_side({name: (engines[name], name) for name in engines}, RAGGED, params)
    wall = time.perf_counter() - t0
    assert _tokens(timed[0][0]) == _tokens(alone[0]) == _tokens(timed[3][0]) == _tokens(timed["auto"][0])
    assert timed[3][0].stats.passes_per_depth == alone[3].stats.passes_per_depth  # the same rounds
    assert sum(seconds for _, seconds, _ in timed.values()) <= wall
    assert all(rate == pytest.approx(out.num_tokens / seconds) for out, seconds, rate in timed.values())
    first, second = engines[0].rounds(RAGGED, params, speculative=0), engines[0].rounds(RAGGED, params)
    assert next(first) == 0  # the round's depth
    with pytest.raises(RuntimeError, match="already running"):
        next(second)
    first.close()  # an abandoned generation frees the engine
    assert _tokens(engines[0].generate(RAGGED, params, speculative=0)) == _tokens(alone[0])


def test_the_evals_engines_are_timed_warm_unless_asked_cold(good_draft_model):
    """`evaluate.warmed_engines`: each arm's engine generates once before it is timed, so adaptive depth
    has measured the machine's costs (as on every rollout of an RL run but the first) and outputs are
    unchanged; warmup=0 gives cold engines (bench/eval_auto.py --cold)."""
    from verl_mtp.trainer.evaluate import warmed_engines

    params = SamplingParams(temperature=0, max_new_tokens=12)
    arms = {"plain": 0, "auto": "auto"}
    warm = warmed_engines(good_draft_model, None, RAGGED, arms, params, warmup=4)
    cold = warmed_engines(good_draft_model, None, RAGGED, arms, params, warmup=0)
    assert [depth for _, depth in warm.values()] == [0, "auto"]
    assert not cold["auto"][0].depth_controller.seconds and cold["auto"][0].depth_controller.rounds == 0
    assert (1 << 2, 0) in warm["auto"][0].depth_controller.seconds  # plain's cost at 4 live rows, measured
    for name, depth in arms.items():
        assert _tokens(warm[name][0].generate(RAGGED, params, speculative=depth)) == \
            _tokens(cold[name][0].generate(RAGGED, params, speculative=depth))


def test_new_rows_catching_up_separately_draft_exactly_as_in_one_wide_chunk(good_draft_model):
    """Rows admitted mid-run (continuous batching) run their MTP catch-up as a separate call; the MTP
    layers' outputs at every position they hold, and so drafts and acceptance, must be those of running
    all rows in one padded chunk. (Sampling makes rows keep different numbers of drafts, so they finish,
    and their slots are refilled, one at a time; both engines draw the same random numbers.)"""
    prompts = [[(5 * j + i) % 24 for j in range(8 + 3 * i)] for i in range(10)]  # ragged, 8-35 tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0)
    split, wide = (NativeEngine(good_draft_model, max_batch_size=3, max_seq_len=64) for _ in range(2))
    wide.max_draft_depth = 10**6  # no row counts as far behind: one chunk for all rows, as before the split
    a, b = split.generate(prompts, params, speculative=2), wide.generate(prompts, params, speculative=2)
    assert _tokens(a) == _tokens(b) and a.stats.accepted_per_depth == b.stats.accepted_per_depth
    assert torch.equal(split._mtp_len, wide._mtp_len)
    for i in range(good_draft_model.num_mtp_layers):  # layer i's outputs (buffer i+1) where it is caught up
        for slot in range(3):
            held = int(split._mtp_len[i, slot])
            assert held > 0 and torch.allclose(split._hidden[i + 1][slot, :held], wide._hidden[i + 1][slot, :held],
                                               atol=1e-5)


def test_stats_are_consistent(good_draft_model):
    engine = NativeEngine(good_draft_model, max_batch_size=8, max_seq_len=64)
    out = engine.generate(RAGGED, SamplingParams(temperature=1.0, max_new_tokens=20, seed=0), speculative=2)
    st = out.stats
    assert st.drafted == 2 * st.verify_passes
    assert st.generated == st.verify_passes + st.accepted
    # accept length = 1 + sum over depths of P(accepted at that depth)
    assert abs(st.accept_length - (1 + st.accept_rate(1) + st.accept_rate(2))) < 1e-9
    assert st.accept_rate(2) <= st.accept_rate(1)
    assert sum(s.stats.verify_passes for s in out.samples) == st.verify_passes
    m = st.metrics()
    assert set(m) >= {"rollout/accept_length", "rollout/accept_rate_1", "rollout/accept_rate_2"}


def test_auto_depth_turns_speculation_off_for_a_useless_draft(good_draft_model):
    model = copy.deepcopy(good_draft_model)
    for layer in model.model.mtp_layers:  # drafts now always miss
        torch.nn.init.zeros_(layer.input_proj.weight)
    model.model.mtp_layers[0].final_layernorm.weight.data.fill_(0.0)
    engine = NativeEngine(model, max_batch_size=4, max_seq_len=128)
    out = engine.generate(RAGGED, SamplingParams(temperature=1.0, max_new_tokens=100, seed=0), speculative="auto")
    rounds = sum(out.depth_histogram.values())
    assert out.depth_histogram.get(0, 0) > 0.6 * rounds


def test_depth_controller_picks_best_measured_rate():
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=2, max_depth=2, warmup_rounds=1, revisit_every=1000)
    cost = {0: 1.0, 1: 1.3, 2: 1.6}  # seconds per round
    accept = [2, 2, 1, 2]  # a good draft: depth 1 kept 4/4, depth 2 kept 3/4
    for _ in range(30):
        d = ctl.choose(batch_size=4)
        ctl.observe(d, 4, cost[d], accept)
    assert ctl.choose(4) == 2  # (1 + ~1 + ~0.75) / 1.6 beats 1 / 1.0 and 2 / 1.3
    # same costs, useless draft: plain wins
    ctl = DepthController(num_mtp_layers=2, max_depth=2, warmup_rounds=1, revisit_every=1000)
    for _ in range(30):
        d = ctl.choose(batch_size=4)
        ctl.observe(d, 4, cost[d], [0, 0, 0, 0])
    assert ctl.choose(4) == 0
    # costs are kept per batch-size bucket: a new bucket is measured afresh
    assert ctl.choose(64) == 0 and ctl.count.get((64, 0), 0) == 0


def test_weight_sync_checksum_and_fresh_draft(good_draft_model, bad_draft_model):
    engine = NativeEngine(copy.deepcopy(bad_draft_model), max_batch_size=4, max_seq_len=64)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    before = engine.generate(RAGGED, params, speculative=2)
    sent = list(good_draft_model.state_dict().items())
    from verl_mtp.models import state_checksum
    checksum = engine.update_weights(sent, version=7)
    assert checksum == state_checksum(sent) == engine.weights_checksum() and engine.version == 7
    after = engine.generate(RAGGED, params, speculative=2)
    reference = NativeEngine(good_draft_model, max_batch_size=4, max_seq_len=64).generate(RAGGED, params, speculative=2)
    assert _tokens(after) == _tokens(reference)
    assert after.stats.accept_length == reference.stats.accept_length  # the draft was refreshed too
    assert after.stats.accept_length > before.stats.accept_length
    # a sync that forgets the MTP tensors leaves a stale draft, and the checksum says so
    trunk_only = [(n, t) for n, t in sent if ".mtp_layers." not in n]
    engine2 = NativeEngine(copy.deepcopy(bad_draft_model), max_batch_size=4, max_seq_len=64)
    assert engine2.update_weights(trunk_only) != state_checksum(sent)


def test_bad_requests_fail_clearly(good_draft_model):
    engine = NativeEngine(good_draft_model, max_batch_size=2, max_seq_len=16)
    short = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], short)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        engine.generate([[1] * 10], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="out of range"):
        engine.generate([[999]], short)
    with pytest.raises(KeyError, match="unknown tensor 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="speculative"):
        engine.generate([[1]], short, speculative=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_warp_probs_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = sampling.warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = sampling.warp_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert torch.equal(sampling.warp_probs(logits, SamplingParams(temperature=0)), torch.tensor([[1.0, 0, 0, 0]]))


def test_sample_follows_each_rows_distribution_and_never_picks_zero_mass():
    n = 100_000
    rows = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    gen = torch.Generator().manual_seed(0)
    tokens = sampling.sample(rows.repeat(n, 1), gen).view(n, 3)
    for r in range(3):
        freq = torch.bincount(tokens[:, r], minlength=5).float() / n
        assert torch.all(freq[rows[r] == 0] == 0)
        assert (freq - rows[r]).abs().max() < 0.006  # ~4 standard errors at p = 0.5
    again = sampling.sample(rows.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 3)
    assert torch.equal(tokens, again)  # seeded


def test_speculative_accept_rule_exact_probabilities():
    # p = (0.6, 0.4), q = (0.2, 0.8): token 0 is always kept (p/q = 3), token 1 w.p. 0.4/0.8 = 0.5,
    # and a rejected token 1 is replaced from max(0, p - q) = (0.4, 0): token 0.
    n = 20000
    p = torch.tensor([[[0.6, 0.4], [0.5, 0.5]]]).expand(n, 2, 2)
    q = torch.tensor([[[0.2, 0.8]]]).expand(n, 1, 2)
    gen = torch.Generator().manual_seed(0)
    draft = torch.multinomial(q[:, 0], 1, generator=gen)
    accepted, nxt = sampling.speculative_accept(p, q, draft, False, gen)
    assert torch.all(accepted[draft[:, 0] == 0] == 1)
    assert abs(accepted[draft[:, 0] == 1].float().mean().item() - 0.5) < 0.02
    assert torch.all(nxt[accepted == 0] == 0)
    first = torch.where(accepted == 1, draft[:, 0], nxt)
    assert abs((first == 0).float().mean().item() - 0.6) < 0.015  # the output token follows p exactly


def test_model_without_mtp_layers_decodes_plain(good_draft_model):
    trunk = MTPCausalLM(copy.deepcopy(good_draft_model.config))
    trunk.config.num_nextn_predict_layers = 0
    trunk = MTPCausalLM(trunk.config)
    engine = NativeEngine(trunk, max_batch_size=2, max_seq_len=32)
    out = engine.generate(RAGGED[:3], SamplingParams(temperature=0, max_new_tokens=5), speculative="auto")
    assert out.stats.accept_length == 1.0 and all(len(s.token_ids) == 5 for s in out.samples)
    with pytest.raises(ValueError, match="needs MTP layers"):
        engine.generate(RAGGED[:1], speculative=2)


def test_observed_depth1_acceptance_matches_the_expected_sum_min_p_q(bad_draft_model):
    """A second, independent losslessness check: every depth-1 draft is accepted with probability
    sum_x min(p, q) (p, q warped as sampled), which a teacher-forced forward over the generated sequences
    gives per round (algos.mtp_loss, the training metric's function). The count of kept drafts must lie
    within 4 binomial standard deviations of the sum of those probabilities; the same probabilities read
    one position off (the target at t+2 instead of t+1) must not."""
    from verl_mtp.algos.mtp_loss import Warp, mtp_token_losses

    prompts = [[int(a), int(b)] for a, b in torch.randint(1, 24, (32, 2), generator=torch.Generator().manual_seed(0))]
    params = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=40, seed=0)
    rounds = collections.defaultdict(list)  # per prompt: tokens kept by prefill, then by each round
    engine = NativeEngine(bad_draft_model, max_batch_size=32, max_seq_len=64)
    out = engine.generate(prompts, params, speculative=1, on_tokens=lambda i, toks: rounds[i].append(len(toks)))
    kept, expected, var, off = 0, 0.0, 0.0, 0.0
    for sample in out.samples:
        ids = torch.tensor([prompts[sample.prompt_index] + sample.token_ids])
        with torch.no_grad():
            fwd = bad_draft_model(ids)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, -2:] = False
        accept = mtp_token_losses(fwd.mtp_logits[0], ids, mask, fwd.logits, 0, "ce", Warp(1.0, top_k=8))[2][0]
        shifted = mtp_token_losses(fwd.mtp_logits[0], ids, mask, fwd.logits, 1, "ce", Warp(1.0, top_k=8))[2][0]
        n = len(prompts[sample.prompt_index]) + rounds[sample.prompt_index][0] - 1  # index of x_n after prefill
        for emitted in rounds[sample.prompt_index][1:-1]:  # the last round may be cut by max_new_tokens
            a = float(accept[n - 1])  # the chain drafted from origin n-1: MTP depth 1 predicts x_{n+1}
            kept, expected, var = kept + (emitted == 2), expected + a, var + a * (1 - a)
            off += float(shifted[n - 1])
            n += emitted
    assert 0.2 < kept / out.stats.passes_per_depth[0] < 0.8  # both outcomes are common: the check has power
    sigma = var ** 0.5
    assert abs(kept - expected) < 4 * sigma, (kept, expected, sigma)
    assert abs(kept - off) > 4 * sigma, (kept, off, sigma)


def _drive(ctl, cost, accepted, rounds=60, batch=4):
    for _ in range(rounds):
        d = ctl.choose(batch_size=batch)
        ctl.observe(d, batch, cost(d), accepted(d))
    return ctl.choose(batch)


def test_depth_controller_searches_past_the_mtp_layers():
    """K=2 layers, depths up to 6 (the last layer reused): a cheap, mostly kept draft is worth depth 6,
    which the search of 0..K (before) could not reach."""
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=2, max_depth=6, warmup_rounds=1, revisit_every=1000)
    assert _drive(ctl, lambda d: 1.0 + 0.1 * d, lambda d: [d, d, d, max(d - 1, 0)]) == 6


def test_depth_controller_continues_unmeasured_depths_from_the_deepest_measured_one():
    """Depths never run take the deepest measured depth's rate onwards (as training's prior is extended):
    a depth-1 draft kept every time makes depth 6 worth a probe even when each depth costs 75 % of a
    plain round more (with 0.5 per unmeasured depth it never would: 4.5 tokens for 5.5x), and a draft
    kept 80 % of the time continues geometrically."""
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=2, max_depth=6, warmup_rounds=2, revisit_every=1000)
    assert ctl.acceptance() == [0.5] * 6  # nothing measured: the flat prior
    for _ in range(5):  # plain twice, then depth 1: a switch round (untimed) and two timed
        d = ctl.choose(8)
        ctl.observe(d, 8, 1.0 + 0.75 * d, [d] * 8)
    assert ctl.count == {(8, 0): 2, (8, 1): 2}
    assert ctl.acceptance() == pytest.approx([1.0] * 6) and ctl.choose(8) == 6
    ctl = DepthController(num_mtp_layers=2, max_depth=6)
    ctl.observe(1, 8, 1.0, [1] * 4 + [0])  # 4 of 5 rows kept their draft
    assert ctl.acceptance()[:3] == pytest.approx([0.8, 0.64, 0.512])


def test_depth_controller_never_costs_a_deeper_round_below_a_shallower_one():
    """Load noise made depth 1 measure 10 % faster than plain; with a useless draft plain must still win."""
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=2, max_depth=2, warmup_rounds=1, revisit_every=1000)
    assert _drive(ctl, {0: 1.0, 1: 0.9, 2: 1.2}.get, lambda d: [0, 0, 0, 0]) == 0


def test_depth_controller_prior_from_training():
    from verl_mtp.rollout.depth import PRIOR_ROUNDS, DepthController, extend_prior

    assert extend_prior([0.8, 0.6], 4) == pytest.approx([0.8, 0.6, 0.45, 0.3375])  # past K: x a_2/a_1 = 0.75
    ctl = DepthController(num_mtp_layers=2, max_depth=4)
    ctl.set_prior([0.8, 0.6])
    assert ctl.expected_tokens()[2] == pytest.approx(2.4)
    ctl.observe(1, 4, 1.0, [0, 0, 0, 0])  # one measured round moves the estimate by 1 / (PRIOR_ROUNDS + 1)
    assert ctl.accept[0] == pytest.approx(0.8 * PRIOR_ROUNDS / (PRIOR_ROUNDS + 1))
    ctl.reset_acceptance()  # a weight sync: back to the prior, not to 0.5
    assert ctl.accept[:2] == pytest.approx([0.8, 0.6])


def test_engine_auto_depth_uses_depths_past_k_and_the_training_prior(good_draft_model):
    engine = NativeEngine(good_draft_model, max_batch_size=4, max_seq_len=128)
    assert engine.depth_controller.max_depth == engine.max_draft_depth == good_draft_model.num_mtp_layers + 4
    engine.set_acceptance_prior([0.9, 0.8])
    assert engine.depth_controller.accept[:2] == pytest.approx([0.9, 0.8])
    params = SamplingParams(temperature=0, max_new_tokens=40)
    out = engine.generate(RAGGED, params, speculative="auto")
    # every depth up to K + 4 (the last layer reused past K) is a candidate with a cost estimate; which ones
    # run depends on this machine's timings (test_depth_controller_searches_past_the_mtp_layers drives it)
    assert sorted(engine.depth_controller.costs(4)) == list(range(good_draft_model.num_mtp_layers + 5))
    assert _tokens(out) == _tokens(engine.generate(RAGGED, params, speculative=0))


def test_depth_controller_re_costs_a_deeper_runner_up():
    """Depth 6 measured slow during warm-up (load), ranking second behind depth 5, and is the best after:
    its re-tries must be timed (the first round of a deeper re-try is a catch-up and is not), so the
    choice moves to it. Before, re-tries of a deeper depth updated acceptance only."""
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=2, max_depth=6, warmup_rounds=1, revisit_every=4)
    calls = collections.Counter()

    def cost(d):
        calls[d] += 1
        return 1.0 + 0.1 * d + (0.3 if d == 6 and calls[d] <= 2 else 0.0)  # warm-up: 7 / 1.9 < 6 / 1.5

    assert _drive(ctl, cost, lambda d: [d] * 4, rounds=400) == 6



def test_depth_controller_measures_only_depths_that_could_win():
    """Drafts that never pay (every depth costs more than its tokens are worth, at acceptance 1): one
    depth-1 probe, no deeper round, and a smaller batch-size bucket starts from the neighbour's relative
    costs instead of trying depths again (before: every depth twice in every bucket)."""
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=2, max_depth=6, revisit_every=1000)
    seen = collections.Counter()
    for batch, scale in ((64, 1.0), (32, 0.5)):
        for _ in range(100):
            d = ctl.choose(batch)
            seen[batch, d] += 1
            ctl.observe(d, batch, scale * (1.0 + 1.2 * d), [d] * batch)
    assert seen[64, 1] == 3 and seen[64, 0] == 97  # the probe: a catch-up round, then warmup_rounds timed
    assert seen[32, 0] == 100
    assert ctl.costs(32)[6] == pytest.approx(0.5 * (1 + 1.2 * 6))  # extrapolated from depth 1's slope


def test_depth_controller_pays_a_catch_up_only_when_the_remaining_work_earns_it():
    """Depth 1 yields 2 tokens for 1.6x a plain round, but switching to it from plain first runs the MTP layer
    over every token it skipped (0.01 s per token here, measured from the catch-up round itself). With
    400 lagging tokens the switch pays for a long remaining batch, not for its last 10 tokens per row."""
    from verl_mtp.rollout.depth import DepthController

    ctl = DepthController(num_mtp_layers=1, max_depth=1, warmup_rounds=1, revisit_every=1000)
    lag = [400]  # newly admitted prompts: the MTP layer has seen none of them
    for _ in range(20):
        d = ctl.choose(4, mtp_lag=lag, horizon=1000)
        ctl.observe(d, 4, {0: 1.0, 1: 1.6}[d] + 0.01 * ctl.catchup_tokens, [d] * 4)
        lag = [4] if d else [lag[0] + 4]
    assert d == 1 and ctl.catchup_cost == pytest.approx(0.01)  # (5.6 s - depth 1's measured 1.6 s) / 400
    ctl.observe(0, 4, 1.0, [0] * 4)  # a plain pass on the same engine: the layer falls 400 tokens behind
    assert ctl.choose(4, mtp_lag=[400], horizon=10) == 0  # 10 / 1.19 + 4.6 s > 10 s plain
    assert ctl.choose(4, mtp_lag=[400], horizon=1000) == 1  # 1000 / 1.19 + 4.6 s < 1000 s
    assert ctl.choose(4) == 1  # without the engine's lag, a switch is costed as free (as before)


def test_depth_controller_prices_the_catch_up_on_prompts_still_queued():
    """Every prompt admitted later is caught up on by each MTP layer a depth uses (continuous batching: a
    few new rows in most rounds). Measured rounds have that time taken out (the engine counts the tokens),
    so a depth's steady cost is its drafting alone, and the queued prompt tokens are priced at the measured
    catch-up cost: with long prompts and short answers, depth 1 no longer pays."""
    from verl_mtp.rollout.depth import DepthController

    def drive(queued_tokens: int) -> tuple[DepthController, list[int]]:
        ctl, choices = DepthController(num_mtp_layers=1, max_depth=1, warmup_rounds=2, revisit_every=1000), []
        for r in range(40):
            d = ctl.choose(4, mtp_lag=[400 if r < 3 else 4], horizon=20, queued_tokens=queued_tokens)
            admitted = 80 if d and r % 2 else 0  # two new 40-token prompts every other round
            caught_up = ctl.catchup_tokens + admitted
            ctl.observe(d, 4, {0: 1.0, 1: 1.6}[d] + 0.01 * caught_up, [d] * 4, caught_up=caught_up)
            choices.append(d)
        return ctl, choices

    ctl, choices = drive(queued_tokens=0)
    assert choices[-10:] == [1] * 10 and ctl.catchup_cost == pytest.approx(0.01, rel=0.05)
    assert ctl.seconds[(4, 1)] == pytest.approx(1.6, rel=0.02)  # admissions' catch-up taken out of the samples
    # 20 tokens per row left: depth 1 takes 20 / (2 / 1.68) = 16.8 s vs plain's 20 s, plus 0.01 s per queued token
    assert ctl.choose(4, mtp_lag=[4], horizon=20, queued_tokens=200) == 1  # +2 s
    assert ctl.choose(4, mtp_lag=[4], horizon=20, queued_tokens=400) == 0  # +4 s
    _, choices = drive(queued_tokens=4000)  # 40 s of catch-up ahead: plain after the probe
    assert choices[-10:] == [0] * 10


def test_depth_controller_re_tries_only_within_its_explore_budget():
    """Plain wins, depth 1 is a close runner-up (1.5 tokens for 1.6x a plain round); a re-try first catches
    the MTP layer up on every token since its last draft. Re-tries are made only while that catch-up costs
    at most `explore_budget` of the decode time since the last one: many when it is cheap, none when it
    is not, and the time spent catching up stays within the budget."""
    from verl_mtp.rollout.depth import DepthController

    def run(per_token: float) -> tuple[int, float, float]:
        ctl = DepthController(num_mtp_layers=1, max_depth=1, warmup_rounds=1, revisit_every=16, max_revisit_every=64)
        lag, retries, catching_up, total = 4, 0, 0.0, 0.0
        for r in range(3000):
            d = ctl.choose(4, mtp_lag=[lag], horizon=1000)
            seconds = {0: 1.0, 1: 1.6}[d] + per_token * ctl.catchup_tokens
            retries += r > 10 and ctl.catchup_tokens > 0
            catching_up += per_token * ctl.catchup_tokens if r > 10 else 0.0
            total += seconds
            ctl.observe(d, 4, seconds, [d * (i < 2) for i in range(4)])
            lag = 4 if d else lag + 4
        return retries, catching_up, total

    # a re-try after n plain rounds (n seconds) catches up on 4n tokens: affordable up to 0.0025 s a token
    retries, catching_up, total = run(per_token=0.002)
    assert retries >= 20 and catching_up <= 0.01 * total
    assert run(per_token=0.003)[0] == 0


def test_depth_controller_switches_up_only_past_its_margin_and_stays_until_a_shallower_depth_wins():
    """Hysteresis: a deeper depth is switched to when it looks `margin` (10 %) faster than the one running,
    a shallower one as soon as it looks faster; so a near-tie does not flip (every flip up pays a catch-up)
    and a depth that looks slower is never kept."""
    from verl_mtp.rollout.depth import DepthController

    def choice(running: int, cost_1: float) -> int:
        ctl = DepthController(num_mtp_layers=1, max_depth=1, warmup_rounds=1, revisit_every=10_000)
        for d in (0, 1, 1):  # plain, then depth 1 probed: every draft kept, 2 tokens a round
            ctl.choose(4)
            ctl.observe(d, 4, {0: 1.0, 1: cost_1}[d], [d] * 4)
        ctl.best[4] = running
        return ctl.choose(4)

    assert choice(running=0, cost_1=1.95) == 0  # 2.6 % faster: not worth a switch up
    assert choice(running=1, cost_1=1.95) == 1  # 2.6 % faster while running: kept
    assert choice(running=1, cost_1=2.05) == 0  # 2.4 % slower: left
    assert choice(running=0, cost_1=1.85) == 0  # 8 % faster: within the margin
    assert choice(running=0, cost_1=1.75) == 1  # 14 % faster: switched to


def test_depth_controller_re_prices_a_leader_the_catch_up_priced_out_every_few_rounds():
    """Depth 1 drafts faster than plain but the prompts still queued make it lose once their catch-up is
    priced; asking the engine for the lag and the work left costs ~2 % of a plain round, so the priced
    decision is kept for `reprice_every` rounds, with the choices an eager lag gives."""
    from verl_mtp.rollout.depth import DepthController

    def run(lazy: bool) -> tuple[list[int], int]:
        ctl = DepthController(num_mtp_layers=1, max_depth=1, warmup_rounds=2, revisit_every=10_000)
        calls, choices = [0], []

        def mtp_lag():
            calls[0] += 1
            return [40]

        for r in range(200):
            d = ctl.choose(4, mtp_lag=mtp_lag if lazy else [40], horizon=20, queued_tokens=4000)
            ctl.observe(d, 4, {0: 1.0, 1: 1.6}[d] + 0.01 * ctl.catchup_tokens, [d] * 4)
            choices.append(d)
        return choices, calls[0]

    (lazy, calls), (eager, _) = run(True), run(False)
    assert lazy == eager and lazy[-150:] == [0] * 150  # 40 s of queued catch-up: plain after the probe
    assert calls <= 200 // 8 + 4


def test_depth_controller_asks_for_the_mtp_lag_only_when_a_switch_up_is_in_question():
    """The engine's lag costs a few tensor ops per round (~0.2 ms, 2 % of a plain round at batch 64 on the
    quickstart's model): given as a function, it is called only when a deeper depth leads or a re-try of
    one is due, and the choices are the ones the list gives."""
    from verl_mtp.rollout.depth import DepthController

    def run(lazy: bool) -> tuple[list[int], int]:
        ctl = DepthController(num_mtp_layers=1, max_depth=1, warmup_rounds=1, revisit_every=16, max_revisit_every=64)
        calls, choices, lag = [0], [], 400

        def mtp_lag():
            calls[0] += 1
            return [lag]

        for _ in range(400):  # depth 1 yields 1.5 tokens for 1.6x a plain round: plain wins, depth 1 is close
            d = ctl.choose(4, mtp_lag=mtp_lag if lazy else [lag], horizon=1000)
            ctl.observe(d, 4, {0: 1.0, 1: 1.6}[d] + 0.01 * ctl.catchup_tokens, [d * (i < 2) for i in range(4)])
            choices.append(d)
            lag = 4 if d else lag + 4
        return choices, calls[0]

    (lazy, calls), (eager, _) = run(True), run(False)
    # the probe only: a re-try would first catch the layer up on 4 tokens per round since the last draft, 4x
    # the explore budget (1 % of the decode time since the last re-try), so none is made
    assert lazy == eager and lazy.count(1) == 2
    assert 0 < calls <= 8  # the probe's, and one per re-try that fell due (16, 32, 64, 64, ... rounds apart)
