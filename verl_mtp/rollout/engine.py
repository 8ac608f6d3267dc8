"""The native rollout engine: preallocated KV cache, continuous batching, lossless MTP speculation.

State of an active sequence slot with tokens x_0..x_n (x_n sampled but not yet run through the trunk):
  * trunk KV and trunk hidden states (buffer 0) are valid for positions [0, n);
  * MTP layer i has KV valid for positions [0, c_i), c_i <= n - i; its outputs are buffer i+1.
One decode round with draft depth S:
  1. draft: MTP layer i (i < min(S, K)) runs once over [c_i, n): the part below n - i catches the layer
     up on confirmed tokens, the rest is speculative and uses drafts d_1..d_i; its output at n-1 drafts
     d_{i+1}. Depths past K reuse the last layer, one position further each step (EAGLE-style);
  2. verify: the trunk runs [x_n, d_1..d_S] in one pass; the acceptance rule keeps a prefix and
     samples one more token, whose logprob (like every returned logprob) comes from this pass;
  3. roll back by bookkeeping only: lengths move forward by what was accepted, and cache entries past
     them are stale, masked by position and overwritten later.
Layers not drafting in a round simply lag and catch up when next used, so depth 0 costs nothing extra.
Rows far behind the rest (a newly admitted prompt) catch up in a separate call first, so one new row
does not widen every row's chunk to its prompt's length.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from verl_mtp.models import MTPCausalLM, state_checksum
from verl_mtp.rollout.depth import DepthController
from verl_mtp.rollout.fast_model import FastModel, inference_dtype
from verl_mtp.rollout.sampling import (SamplingParams, apply_penalties, sample, speculative_accept, target_logprobs,
                                       warp_probs)


@dataclass
class SpecStats:
    """Speculation counters; accept_length = generated tokens / target decode passes (per sequence)."""

    verify_passes: int = 0
    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)  # passes whose draft at depth k was kept
    passes_per_depth: list[int] = field(default_factory=list)  # passes that drafted at depth k

    def record(self, depth: int, accepted: list[int]) -> None:
        """One verify pass per row; `accepted[r]` drafts of row r were kept (0..depth)."""
        rows, kept = len(accepted), sum(accepted)
        self.verify_passes += rows
        self.generated += kept + rows
        self.drafted += depth * rows
        self.accepted += kept
        self._grow(depth)
        for k in range(depth):
            self.passes_per_depth[k] += rows
            self.accepted_per_depth[k] += sum(a > k for a in accepted)

    def _grow(self, depth: int) -> None:
        while len(self.passes_per_depth) < depth:
            self.passes_per_depth.append(0)
            self.accepted_per_depth.append(0)

    def merge(self, other: "SpecStats") -> None:
        self.verify_passes += other.verify_passes
        self.generated += other.generated
        self.drafted += other.drafted
        self.accepted += other.accepted
        self._grow(len(other.passes_per_depth))
        for k, (p, a) in enumerate(zip(other.passes_per_depth, other.accepted_per_depth)):
            self.passes_per_depth[k] += p
            self.accepted_per_depth[k] += a

    @property
    def accept_length(self) -> float:
        return self.generated / self.verify_passes if self.verify_passes else 1.0

    @property
    def drafting_passes(self) -> int:
        """Verify passes that checked at least one draft (adaptive depth may run some at depth 0). Stats
        without per-depth counts (e.g. from an engine that always drafts) count every pass."""
        return self.passes_per_depth[0] if self.passes_per_depth else self.verify_passes

    @property
    def drafting_accept_length(self) -> float:
        """Tokens per verify pass over the passes that drafted: what the draft is worth when it is used,
        independent of how often adaptive depth switched speculation off."""
        return 1.0 + self.accepted / self.drafting_passes if self.drafting_passes else 1.0

    def accept_rate(self, depth: int) -> float:
        """P(draft at depth `depth` (1-based) accepted | it was drafted)."""
        k = depth - 1
        if k >= len(self.passes_per_depth) or not self.passes_per_depth[k]:
            return 0.0
        return self.accepted_per_depth[k] / self.passes_per_depth[k]

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        out = {f"{prefix}accept_length": self.accept_length, f"{prefix}draft_tokens": float(self.drafted),
               f"{prefix}accepted_tokens": float(self.accepted), f"{prefix}verify_passes": float(self.verify_passes)}
        for k in range(1, len(self.passes_per_depth) + 1):
            out[f"{prefix}accept_rate_{k}"] = self.accept_rate(k)
        return out


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # target-model log softmax(logits / T) of each generated token
    finish_reason: str  # "stop" | "length"
    stats: SpecStats


@dataclass
class GenerateOutput:
    samples: list[Sample]  # prompt-major: the n samples of prompt 0, then prompt 1, ...
    stats: SpecStats
    seconds: float
    depth_histogram: dict[int, int]  # decode rounds per chosen draft depth

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


@dataclass
class _Seq:
    prompt_index: int
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stats: SpecStats = field(default_factory=SpecStats)


class NativeEngine:
    """Batched generation with the policy's own MTP layers as the draft.

    speculative: default draft depth for `generate`: an int (0 = plain decoding; more steps than MTP
    layers reuse the last layer) or "auto" (depth chosen per round from measured acceptance and costs).
    dtype: the inference dtype (`rollout.dtype`: "bfloat16", "float32", ... or a torch dtype); None keeps
    the model's. The model's parameters stay the canonical weights (checksummed); the engine decodes with
    a copy derived from them (`rollout.fast_model`), re-derived whenever they change. Returned log-probs
    are float32 log-softmaxes of the inference dtype's logits.
    """

    def __init__(self, model: MTPCausalLM, tokenizer=None, max_batch_size: int = 64, max_seq_len: int = 1024,
                 speculative: int | str = "auto", max_draft_depth: int | None = None,
                 dtype: str | torch.dtype | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.speculative = speculative
        k = model.num_mtp_layers
        # depths past K reuse the last MTP layer, for fixed depths and in the "auto" search alike
        self.max_draft_depth = max_draft_depth if max_draft_depth is not None else (k + 4 if k else 0)
        self.version: int | None = None
        p = model.lm_head.weight
        self.device = p.device
        self.dtype = inference_dtype(dtype, p.device, p.dtype)
        # one spare position past the end: padded chunk entries go there and are never read as valid
        self._scratch = max_seq_len + self.max_draft_depth + 1
        self.fast = FastModel(model, self.dtype, self._scratch + 1)
        self.cache = self.fast.allocate_cache(max_batch_size)
        hidden = model.config.hidden_size
        self._hidden = torch.zeros(k + 1, max_batch_size, self._scratch + 1, hidden, dtype=self.dtype, device=self.device)
        self._tokens = torch.zeros(max_batch_size, self._scratch + 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # n per slot
        self._mtp_len = torch.zeros(max(k, 1), max_batch_size, dtype=torch.long, device=self.device)  # c_i
        self.depth_controller = DepthController(k, self.max_draft_depth)
        self._mean_len: float | None = None  # generated tokens per finished sequence (running mean)
        self._on_tokens: Callable[[int, list[int]], None] | None = None
        self._busy = False  # a generation owns the slots
        self._caught_up = 0  # tokens the MTP layers caught up on in this round (see _draft)

    # ---- public API ----------------------------------------------------------------------

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams | None = None,
                 speculative: int | str | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerateOutput:
        """on_tokens(prompt_index, tokens) is called with each sequence's newly kept tokens as they
        are produced (streaming); the n samples of a prompt share its index."""
        rounds = self.rounds(prompt_token_ids, params, speculative, on_tokens)
        while True:
            try:
                next(rounds)
            except StopIteration as finished:
                return finished.value

    @torch.no_grad()
    def rounds(self, prompt_token_ids: list[list[int]], params: SamplingParams | None = None,
               speculative: int | str | None = None,
               on_tokens: Callable[[int, list[int]], None] | None = None) -> Generator[int, None, GenerateOutput]:
        """`generate`, one round at a time: yields after each round (admission, prefill and one decode
        round; the value is the round's depth, -1 when it only prefilled) and returns the GenerateOutput.
        Lets a caller step several engines in turn, e.g. to time them side by side. The engine's slots
        belong to one generation at a time."""
        params = params or SamplingParams()
        depth_setting = self.speculative if speculative is None else speculative
        self._check_request(prompt_token_ids, params, depth_setting)
        if self._busy:
            raise RuntimeError("NativeEngine: a generation is already running on this engine")
        self._busy, self._on_tokens = True, on_tokens
        try:
            if self.fast.stale():  # the model's weights changed in place since the copy was derived
                self.fast.refresh()
            return (yield from self._run(prompt_token_ids, params, depth_setting))
        finally:
            self._busy, self._on_tokens = False, None

    def _run(self, prompt_token_ids, params: SamplingParams, depth_setting):
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        queue = deque((i, p) for i, p in enumerate(prompt_token_ids) for _ in range(params.n))
        queued_tokens = params.n * sum(map(len, prompt_token_ids))  # what MTP layers will catch up on
        free = list(range(self.max_batch_size - 1, -1, -1))
        active: dict[int, _Seq] = {}
        done: list[_Seq] = []
        stats, histogram = SpecStats(), {}
        start = time.perf_counter()
        while queue or active:
            admitted = []
            while queue and free:
                index, prompt = queue.popleft()
                queued_tokens -= len(prompt)
                slot = free.pop()
                active[slot] = _Seq(prompt_index=index, prompt_len=len(prompt))
                admitted.append((slot, prompt))
            if admitted:
                self._prefill(admitted, active, params, gen)
            live = [s for s, q in active.items() if q.finish_reason is None]
            depth = -1
            if live:
                depth = 0 if params.penalized else self._round_depth(depth_setting, live, active, len(queue),
                                                                      queued_tokens, params)
                t0 = time.perf_counter()
                self._caught_up = 0
                accepted = self._decode_round(live, active, depth, params, gen)
                self.depth_controller.observe(depth, len(live), time.perf_counter() - t0, accepted, self._caught_up)
                stats.record(depth, accepted)
                histogram[depth] = histogram.get(depth, 0) + 1
            for slot in [s for s, q in active.items() if q.finish_reason is not None]:
                done.append(active.pop(slot))
                free.append(slot)
                length = len(done[-1].tokens)  # a running mean of sequence lengths: what auto expects to remain
                self._mean_len = length if self._mean_len is None else 0.9 * self._mean_len + 0.1 * length
            yield depth
        done.sort(key=lambda q: q.prompt_index)  # stable: samples of a prompt keep their order
        samples = [Sample(q.prompt_index, q.tokens, q.logprobs, q.finish_reason, q.stats) for q in done]
        return GenerateOutput(samples, stats, time.perf_counter() - start, histogram)

    @torch.no_grad()
    def update_weights(self, named_tensors, version: int | None = None) -> str:
        """Copy trunk and MTP tensors in place; returns the new checksum for the caller to compare."""
        state = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"update_weights: unknown tensor '{name}'")
            if state[name].shape != tensor.shape:
                raise ValueError(f"update_weights: tensor '{name}' has shape {tuple(tensor.shape)}, "
                                 f"engine expects {tuple(state[name].shape)}")
            state[name].copy_(tensor)
        self.fast.refresh()  # the inference copy, from the tensors just written, in this same call
        self.version = version
        # the acceptance estimate belongs to the old draft: a fresh (or stale) draft must be re-measured
        self.depth_controller.reset_acceptance()
        return self.weights_checksum()

    def set_acceptance_prior(self, chain_rates: list[float]) -> None:
        """Training's expected P(drafts 1..k kept) per depth for the weights just synced
        (`mtp/expected_chain_accept_rate_{k}`): adaptive depth starts from it instead of 0.5."""
        self.depth_controller.set_prior(chain_rates)

    def weights_checksum(self) -> str:
        return state_checksum(self.model.state_dict().items())

    # ---- internals -----------------------------------------------------------------------

    def _check_request(self, prompts, params: SamplingParams, depth_setting) -> None:
        if depth_setting != "auto" and not (isinstance(depth_setting, int) and depth_setting >= 0):
            raise ValueError(f"speculative must be a non-negative int or 'auto', got {depth_setting!r}")
        if isinstance(depth_setting, int) and depth_setting > 0 and self.model.num_mtp_layers == 0:
            raise ValueError("speculative decoding needs MTP layers; the model has none (use speculative=0)")
        if isinstance(depth_setting, int) and depth_setting > self.max_draft_depth:
            raise ValueError(f"speculative={depth_setting} exceeds the engine's max_draft_depth={self.max_draft_depth}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs an engine built with a tokenizer")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + params.max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} "
                                 f"exceeds max_seq_len {self.max_seq_len}")
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i}: token id out of range [0, {vocab})")

    def _round_depth(self, setting, live: list[int], active, queued: int, queued_tokens: int,
                     params: SamplingParams) -> int:
        if setting != "auto":
            return setting
        if not self.model.num_mtp_layers:
            return 0
        # what a switch up costs now (computed only when the controller asks) and how much work remains
        def mtp_lag() -> list[int]:
            slots = torch.tensor(live, device=self.device)
            steps = torch.arange(self.model.num_mtp_layers, device=self.device)[:, None]
            return (self._pos[slots][None] - steps - self._mtp_len[:, slots]).clamp(min=0).sum(1).tolist()

        def horizon() -> float:
            expected = min(self._mean_len or params.max_new_tokens, params.max_new_tokens)
            return (sum(max(expected - len(active[s].tokens), 1) for s in live) + queued * expected) / len(live)

        return self.depth_controller.choose(len(live), mtp_lag=mtp_lag, horizon=horizon, queued_tokens=queued_tokens)

    def _prefill(self, admitted, active, params: SamplingParams, gen) -> None:
        slots = torch.tensor([s for s, _ in admitted], device=self.device)
        lens = torch.tensor([len(p) for _, p in admitted], device=self.device)
        width = int(lens.max())
        chunk = torch.zeros(len(admitted), width, dtype=torch.long, device=self.device)
        for row, (_, prompt) in enumerate(admitted):
            chunk[row, : len(prompt)] = torch.tensor(prompt)
        positions = torch.arange(width, device=self.device).expand(len(admitted), width)
        self._tokens[slots, :width] = chunk
        hidden = self.fast.trunk_step(chunk, positions, self.cache, slots)
        self._hidden[0][slots[:, None], positions] = hidden
        logits = self.fast.lm_logits(hidden[torch.arange(len(admitted)), lens - 1])
        token = sample(warp_probs(logits, params), gen)
        self._tokens[slots, lens] = token
        self._pos[slots] = lens
        self._mtp_len[:, slots] = 0
        logprob = target_logprobs(logits, token, params)
        for row, (slot, _) in enumerate(admitted):
            self._append(active[slot], [int(token[row])], [float(logprob[row])], params)

    def _decode_round(self, live: list[int], active, depth: int, params: SamplingParams, gen) -> list[int]:
        slots = torch.tensor(live, device=self.device)
        n = self._pos[slots]
        drafts, draft_probs = self._draft(slots, n, depth, params, gen)
        steps = torch.arange(depth + 1, device=self.device)
        positions = n[:, None] + steps
        chunk = self._tokens[slots[:, None], positions]  # x_n, d_1..d_S
        hidden = self.fast.trunk_step(chunk, positions, self.cache, slots)
        self._hidden[0][slots[:, None], positions] = hidden
        logits = self.fast.lm_logits(hidden)  # (B, S+1, V)
        target = logits
        if params.penalized:  # depth 0 (see `generate`): one position per row
            target = apply_penalties(logits[:, 0], [active[s].tokens for s in live], params)[:, None]
        accepted, nxt = speculative_accept(warp_probs(target, params), draft_probs, drafts, params.greedy, gen)
        rows = torch.arange(len(live), device=self.device)
        self._tokens[slots, n + accepted + 1] = nxt
        self._pos[slots] = n + accepted + 1
        new_tokens = torch.cat([drafts, nxt[:, None]], dim=1)
        new_tokens[rows, accepted] = nxt
        logprobs = target_logprobs(logits, new_tokens, params)
        # one host transfer each, then plain Python per row (per-row tensor ops cost ~ms at batch 64)
        kept, tokens, lps = accepted.tolist(), new_tokens.tolist(), logprobs.tolist()
        for row, slot in enumerate(live):
            seq = active[slot]
            seq.stats.record(depth, kept[row: row + 1])
            self._append(seq, tokens[row][: kept[row] + 1], lps[row][: kept[row] + 1], params)
        return kept

    def _draft(self, slots, n, depth: int, params: SamplingParams, gen):
        """Draft `depth` tokens per row into the token buffer at n+1..n+depth; returns (drafts, q)."""
        b = slots.numel()
        if depth == 0:
            empty = torch.zeros(b, 0, dtype=torch.long, device=self.device)
            return empty, torch.zeros(b, 0, self.model.config.vocab_size, device=self.device)
        k = self.model.num_mtp_layers
        drafts, probs = [], []
        for i in range(min(depth, k)):
            start = self._mtp_len[i, slots]
            # rows far behind (a new prompt, or rounds at depth 0) first catch up on confirmed positions alone,
            # so they do not widen every row's chunk; a drafting row lags by at most depth + 1 positions
            behind = n - i - 1 - start > self.max_draft_depth + 1
            if bool(behind.any()):  # counted for adaptive depth: catching up is priced apart from drafting
                self._caught_up += int(torch.where(behind, n - i - 1 - start, 0).sum())
                if not bool(behind.all()):
                    rows = behind.nonzero().squeeze(1)
                    self._mtp_chunk(i, slots[rows], start[rows], n[rows] - i - 1)
                    start = torch.where(behind, n - i - 1, start)
            out = self._mtp_chunk(i, slots, start, n)
            self._mtp_len[i, slots] = n - i
            last = out[torch.arange(b, device=self.device), n - 1 - start]
            self._push_draft(last, slots, n + i + 1, drafts, probs, params, gen)
        for j in range(k + 1, depth + 1):  # reuse the last layer, one position further per step
            pos = n - 1 + (j - k)
            out = self.fast.mtp_step(k - 1, self._hidden[k][slots, pos - 1][:, None],
                                      self._tokens[slots, pos + k][:, None], pos[:, None], self.cache, slots)
            self._hidden[k][slots, pos] = out[:, 0]
            self._push_draft(out[:, 0], slots, n + j, drafts, probs, params, gen)
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1)

    def _mtp_chunk(self, i: int, slots, start, stop):
        """MTP layer i over positions [start, stop) of each row (ragged rows are padded to the widest with
        the scratch position); writes its outputs to buffer i+1 and returns them, (B, width, H)."""
        width = int((stop - start).max())
        positions = start[:, None] + torch.arange(width, device=self.device)
        positions = torch.where(positions < stop[:, None], positions, self._scratch)
        out = self.fast.mtp_step(i, self._hidden[i][slots[:, None], positions],
                                  self._tokens[slots[:, None], (positions + i + 1).clamp(max=self._scratch)],
                                  positions, self.cache, slots, length=int(stop.max()))
        self._hidden[i + 1][slots[:, None], positions] = out
        return out

    def _push_draft(self, hidden, slots, at, drafts, probs, params, gen) -> None:
        q = warp_probs(self.fast.lm_logits(hidden), params)
        token = q.argmax(-1) if params.greedy else sample(q, gen)
        self._tokens[slots, at] = token
        drafts.append(token)
        probs.append(q)

    def _append(self, seq: _Seq, tokens: list[int], logprobs: list[float], params: SamplingParams) -> None:
        start = len(seq.tokens)
        for token, logprob in zip(tokens, logprobs):
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            if token in params.stop_token_ids or self._hit_stop_string(seq, params):
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= params.max_new_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                break
        if self._on_tokens is not None:
            self._on_tokens(seq.prompt_index, seq.tokens[start:])

    def _hit_stop_string(self, seq: _Seq, params: SamplingParams) -> bool:
        if not params.stop:
            return False
        text = self.tokenizer.decode(seq.tokens[-16:])
        return any(s in text for s in params.stop)
