"""DPO of a small MTP model on preference pairs: the stage after SFT.

    verl-mtp dpo --model checkpoints/sft --data pairs.jsonl --out checkpoints/dpo

Rows (JSONL or parquet) hold `prompt` (a string, sent as one user message, or a list of chat
messages), `chosen` and `rejected` (assistant replies as strings; each gets the EOS appended, as the
rollout would generate it). A malformed row stops the run before training with one line naming the
file, the row and the field; `--skip-bad-rows` drops such rows and counts them instead.

Per pair, with s(y) the summed log-probability of the response tokens y:

    z    = beta * ((s_θ(chosen) - s_ref(chosen)) - (s_θ(rejected) - s_ref(rejected)))
    loss = -log sigmoid(z)                                          (sigmoid DPO)
         + kl_coef  * mean k3(log π_θ, log π_ref) over chosen tokens (optional anchor)
         + mtp_scale * MTP cross-entropy on the chosen response      (keeps the draft fresh)

The reference (`--ref`, default: the policy before training) scores every pair once, before the
first update, and its per-token log-probabilities are stored with the pair, so no reference model
is held during training. The KL term is the k3 estimator evaluated at the dataset's chosen tokens:
an anchor against the known DPO drift where chosen and rejected likelihoods fall together, not an
unbiased KL (that would need samples from the policy); on the rejected tokens it would fight the
very gradient DPO wants. The MTP term trains the draft heads on the replies the policy is pushed
towards; with --mtp-detach (default) its gradient reaches only the MTP layers, and the trunk's and
the MTP layers' gradients are clipped separately, so the MTP term cannot shrink the trunk's step.

`--out DIR` ends as an HF/MiMo folder with the tokenizer beside the weights. Metrics (TRL's names:
rewards/margins, rewards/accuracies, logps/chosen, ...) go to DIR/dpo_metrics.jsonl. DIR/checkpoint/
(every --save-every steps and at the end; the training core's format) makes re-running the same command
resume exactly where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from verl_mtp.algos.kl import kl_penalty
from verl_mtp.cli import OneLineParser
from verl_mtp.algos.mtp_loss import compute_mtp_loss
from verl_mtp.algos.tensor_ops import logprobs_from_logits
from verl_mtp.engines import core
from verl_mtp.engines.core import (CheckpointMismatch, DeferredInterrupt, MetricsLog, OptimConfig, apply_update,
                                   clip_gradients, clip_groups, clip_norm, load_module_tensors, module_tensors,
                                   norm_metrics, pad_batch)
from verl_mtp.models import MTPCausalLM
from verl_mtp.models.moe import moe_metrics

METRICS_FILE = "dpo_metrics.jsonl"
CONFIG_FILE = "dpo_config.json"
CHECKPOINT_DIR = "checkpoint"
# options that do not change the run's trajectory: a resume may change them
FREE_ON_RESUME = ("out", "eval_data", "log_every", "save_every", "resume", "device")
MAX_NAN_STREAK = 10  # consecutive non-finite gradients before giving up
# files of an HF tokenizer folder, copied as they are (transformers versions disagree on how to re-save them)


class DPOError(ValueError):
    """A problem with the options, the data or a model folder that the user can fix; one line."""


@dataclass
class DPOConfig:
    """Every option of `verl-mtp dpo` (field `max_len` is flag `--max-len`)."""

    model: str = "checkpoints/sft"  # HF/MiMo folder: the initial policy
    data: str = "data/dpo.jsonl"  # JSONL or parquet of {prompt, chosen, rejected}
    out: str | None = "checkpoints/dpo"  # None: train in place, save nothing (library use)
    ref: str | None = None  # reference folder; None: the initial policy
    tokenizer: str | None = None  # None: the one in `model`
    eval_data: str | None = None  # pairs scored at the end (margins, accuracy)
    # objective
    beta: float = 0.1
    kl_coef: float = 0.0
    mtp_scale: float = 0.1
    mtp_detach: bool = True
    max_len: int = 512  # prompt + response tokens; longer responses are truncated
    skip_bad_rows: bool = False
    # optimisation
    epochs: int = 1
    max_steps: int = 0  # 0: as many as `epochs` gives
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5
    schedule: str = "cosine"  # after linear warmup: "cosine" | "constant"
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # matrices and embeddings only, not norms or biases
    grad_clip: float = 1.0  # 0: off
    log_every: int = 10
    save_every: int = 100  # steps between checkpoints in `out`/checkpoint (0: none); the last step always saves
    resume: bool = True  # continue from `out`/checkpoint when there is one
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """Raise DPOError naming the first bad option as its flag."""
        rules = [
            ("beta", self.beta > 0, "must be > 0"), ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("mtp_scale", self.mtp_scale >= 0, "must be >= 0"), ("max_len", self.max_len >= 2, "must be >= 2"),
            ("epochs", self.epochs >= 1, "must be >= 1"), ("max_steps", self.max_steps >= 0, "must be >= 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"), ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"), ("schedule", self.schedule in ("cosine", "constant"),
                                                 "must be cosine or constant"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("save_every", self.save_every >= 0, "must be >= 0"),
        ]
        for name, ok, requirement in rules:
            if not ok:
                raise DPOError(f"{_flag(name)} {requirement} (got {getattr(self, name)!r})")
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise DPOError(f"{_flag(name)} {path}: no such file")
        for name in ("model", "ref", "tokenizer"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise DPOError(f"{_flag(name)} {path}: no such folder")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- data ------------------------------------------------------------------------------------


@dataclass
class PreferencePair:
    prompt: list[int]  # chat-templated prompt ids, ending with the generation prompt
    chosen: list[int]  # response ids + EOS, truncated to fit max_len
    rejected: list[int]
    ref_chosen: list[float] | None = None  # per-token log π_ref of `chosen`, filled by score_reference
    ref_rejected: list[float] | None = None


class _RowError(ValueError):
    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field = field


def iter_rows(path: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a JSONL or parquet file; `where` is `line N` (JSONL, 1-based, as an
    editor shows it) or `row N` (parquet, 0-based, as pandas shows it). A JSONL line that is not JSON
    comes back as a _RowError in place of the row."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i}", row
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"line {lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"line {lineno}", _RowError(None, f"not valid JSON ({e.msg})")
    else:
        raise DPOError(f"{path}: unknown format '{suffix}' (use .jsonl or .parquet)")


def parse_row(row: object) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen, rejected) of a row, or _RowError naming the field at fault."""
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError(None, f"must be an object with prompt, chosen and rejected (got {type(row).__name__})")
    for name in ("prompt", "chosen", "rejected"):
        if name not in row:
            raise _RowError(name, "is missing")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise _RowError("prompt", f"must be a string or a non-empty list of chat messages (got {_kind(prompt)})")
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _RowError("prompt", f"message {i} must be {{'role': str, 'content': str}} (got {m!r:.60})")
    if not any(m["content"].strip() for m in prompt):
        raise _RowError("prompt", "is empty")
    for name in ("chosen", "rejected"):
        if not isinstance(row[name], str) or not row[name]:
            raise _RowError(name, f"must be a non-empty string (got {_kind(row[name])})")
    return prompt, row["chosen"], row["rejected"]


def _kind(value: object) -> str:
    return repr(value) if isinstance(value, str) else type(value).__name__


def load_pairs(path: str, tokenizer, max_len: int, skip_bad_rows: bool = False
               ) -> tuple[list[PreferencePair], dict[str, int]]:
    """Tokenize a preference file. A bad row raises DPOError (`FILE line N: field 'chosen' ...`), or with
    `skip_bad_rows` is dropped, counted and the first one reported. Returns pairs and counts
    {pairs, bad, truncated}."""
    from verl_mtp.data.tokenizer import encode_chat, encode_response

    pairs, bad, first_bad, truncated = [], 0, None, 0
    for where, row in iter_rows(path):
        try:
            messages, chosen, rejected = parse_row(row)
            prompt = encode_chat(tokenizer, messages)
            room = max_len - len(prompt)
            if room < 1:
                raise _RowError("prompt", f"is {len(prompt)} tokens, leaving no room for a response within "
                                          f"--max-len {max_len}")
        except _RowError as e:
            message = f"{path} {where}: " + (f"field '{e.field}' " if e.field else "") + str(e)
            if not skip_bad_rows:
                raise DPOError(message) from None
            bad, first_bad = bad + 1, first_bad or message
            continue
        chosen_ids, rejected_ids = encode_response(tokenizer, chosen), encode_response(tokenizer, rejected)
        truncated += len(chosen_ids) > room or len(rejected_ids) > room
        pairs.append(PreferencePair(prompt, chosen_ids[:room], rejected_ids[:room]))
    if bad:
        _say(f"skipped {bad} bad rows (first: {first_bad})")
    if not pairs:
        raise DPOError(f"{path}: no usable preference pairs")
    return pairs, {"pairs": len(pairs), "bad": bad, "truncated": truncated}


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int, device=None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, response) pairs -> right-padded (B, T) input_ids, attention_mask, response_mask."""
    return pad_batch([p + r for p, r in sequences], [[0] * len(p) + [1] * len(r) for p, r in sequences], pad_id,
                     device)


# ---- log-probabilities, the loss ---------------------------------------------------------------


def token_logps(logits: torch.Tensor, ids: torch.Tensor, response_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) log-probability of each token 1..T-1 given its prefix, zero off the response, and the
    (B, T-1) mask of response tokens it is aligned with."""
    mask = response_mask[:, 1:]
    return logprobs_from_logits(logits[:, :-1], ids[:, 1:]) * mask, mask


@torch.no_grad()
def score_reference(reference: MTPCausalLM, pairs: list[PreferencePair], pad_id: int, batch_size: int = 16,
                    progress: bool = False) -> None:
    """Store the reference's per-token log-probabilities in every pair: one forward per batch of pairs
    (chosen and rejected together), done once, before training."""
    from tqdm import tqdm

    was_training = reference.training
    reference.eval()
    device = reference.lm_head.weight.device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen),
                                                                                 len(pairs[i].rejected)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="reference", unit="batch", disable=None if progress else True):
        chunk = [pairs[i] for i in batch]
        seqs = [(p.prompt, p.chosen) for p in chunk] + [(p.prompt, p.rejected) for p in chunk]
        ids, attention, response = collate(seqs, pad_id, device)
        logps, mask = token_logps(reference(ids, attention, num_mtp=0).logits, ids, response)
        rows = [row[m.bool()].tolist() for row, m in zip(logps.float().cpu(), mask.cpu())]
        for k, pair in enumerate(chunk):
            pair.ref_chosen, pair.ref_rejected = rows[k], rows[len(chunk) + k]
    reference.train(was_training)


def _ref_tensor(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-token reference log-probabilities laid out like `mask` (B, T-1): row-major order of the set
    positions is exactly the order of each row's response tokens."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask.bool()] = torch.tensor([v for row in values for v in row], dtype=torch.float32, device=mask.device)
    return out


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO on (B,) summed log-probabilities: (per-pair loss, chosen reward, rejected reward),
    where reward = beta * (log π_θ - log π_ref) and loss = -log sigmoid(chosen reward - rejected reward)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward.detach(), rejected_reward.detach()


def pair_losses(policy: MTPCausalLM, pairs: list[PreferencePair], cfg: DPOConfig, pad_id: int, num_pairs: int,
                num_chosen_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, normalised by the whole optimizer step (`num_pairs` pairs, and
    `num_chosen_tokens` chosen response tokens for the per-token terms), so micro-batches add up to the
    step's mean; and the step's metric sums (divided by `num_pairs` by the caller)."""
    device = policy.lm_head.weight.device
    c_ids, c_att, c_resp = collate([(p.prompt, p.chosen) for p in pairs], pad_id, device)
    r_ids, r_att, r_resp = collate([(p.prompt, p.rejected) for p in pairs], pad_id, device)
    use_mtp = cfg.mtp_scale > 0 and policy.num_mtp_layers > 0
    out_c = policy(c_ids, c_att, num_mtp=None if use_mtp else 0, mtp_detach=cfg.mtp_detach)
    out_r = policy(r_ids, r_att, num_mtp=0)
    logps_c, mask_c = token_logps(out_c.logits, c_ids, c_resp)
    logps_r, mask_r = token_logps(out_r.logits, r_ids, r_resp)
    ref_c = _ref_tensor([p.ref_chosen for p in pairs], mask_c)
    ref_r = _ref_tensor([p.ref_rejected for p in pairs], mask_r)
    losses, chosen_reward, rejected_reward = dpo_loss(logps_c.sum(-1), logps_r.sum(-1), ref_c.sum(-1), ref_r.sum(-1),
                                                      cfg.beta)
    loss = losses.sum() / num_pairs
    kl = (kl_penalty(logps_c, ref_c, "low_var_kl") * mask_c).sum() / num_chosen_tokens
    if cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * kl
    metrics = {"loss/dpo": losses.detach().sum().item(), "rewards/chosen": chosen_reward.sum().item(),
               "rewards/rejected": rejected_reward.sum().item(),
               "rewards/margins": (chosen_reward - rejected_reward).sum().item(),
               "rewards/accuracies": (chosen_reward > rejected_reward).float().sum().item(),
               "logps/chosen": logps_c.detach().sum().item(), "logps/rejected": logps_r.detach().sum().item(),
               # a per-token mean over the step: scaled to a per-pair sum like the others
               "kl/chosen": kl.item() * num_pairs}
    if use_mtp:
        mtp, mtp_metrics = compute_mtp_loss(out_c.mtp_logits, c_ids, c_resp, cfg.mtp_scale, num_chosen_tokens)
        loss = loss + mtp
        share = float(mask_c.sum()) / num_chosen_tokens * num_pairs  # this micro-batch's weight in the step
        metrics.update({k: v * share for k, v in mtp_metrics.items()})
    if out_c.moe_stats is not None:  # MoE: load balancing over both forwards, weighted by this micro-batch's pairs
        aux = (out_c.aux_loss + out_r.aux_loss) / 2
        loss = loss + aux * (len(pairs) / num_pairs)
        moe = moe_metrics(aux, torch.cat([out_c.moe_stats, out_r.moe_stats]))
        metrics.update({k: v * len(pairs) for k, v in moe.items()})  # per-pair sums, like the other metrics
    return loss, metrics


@torch.no_grad()
def evaluate_dpo(policy: MTPCausalLM, pairs: list[PreferencePair], beta: float, pad_id: int,
                 batch_size: int = 16) -> dict[str, float]:
    """Mean rewards, margin, accuracy and log-probabilities of `pairs` (reference already scored)."""
    was_training = policy.training
    policy.eval()
    sums: dict[str, float] = defaultdict(float)
    cfg = DPOConfig(beta=beta, mtp_scale=0.0)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        tokens = float(sum(len(p.chosen) for p in chunk))
        _, metrics = pair_losses(policy, chunk, cfg, pad_id, len(chunk), tokens)
        for k, v in metrics.items():
            sums[k] += v
    policy.train(was_training)
    return {k: v / len(pairs) for k, v in sums.items()}


# ---- optimisation ------------------------------------------------------------------------------


def build_optimizer(policy: MTPCausalLM, cfg: DPOConfig, total_steps: int):
    """AdamW (default betas; weight decay on matrices and embeddings only) and linear warmup + cosine or
    constant LR."""
    return core.build_optimizer(
        [p for p in policy.parameters() if p.requires_grad],
        OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, decay_vectors=False, schedule=cfg.schedule,
                    warmup_steps=round(cfg.warmup_ratio * total_steps), total_steps=total_steps,
                    min_lr_ratio=cfg.min_lr_ratio, clip_grad=cfg.grad_clip))


def plan_steps(num_pairs: int, cfg: DPOConfig) -> list[list[list[int]]]:
    """Optimizer steps as lists of micro-batches of pair indices: each epoch a fresh shuffle (a function
    of seed and epoch), cut into micro-batches, grouped `grad_accum` at a time; capped by max_steps."""
    steps = []
    for epoch in range(cfg.epochs):
        order = list(range(num_pairs))
        random.Random(f"{cfg.seed}/{epoch}").shuffle(order)
        micro = [order[i:i + cfg.batch_size] for i in range(0, num_pairs, cfg.batch_size)]
        steps += [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    return steps[:cfg.max_steps] if cfg.max_steps else steps


def train_step(policy, opt, sched, micro_batches: list[list[PreferencePair]], cfg: DPOConfig,
               pad_id: int) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); per-pair means of the metrics.
    A non-finite gradient skips the update (train/nan_skipped = 1) rather than poisoning the weights."""
    num_pairs = sum(len(m) for m in micro_batches)
    num_chosen_tokens = float(sum(len(p.chosen) for m in micro_batches for p in m))
    sums: dict[str, float] = defaultdict(float)
    for pairs in micro_batches:
        loss, metrics = pair_losses(policy, pairs, cfg, pad_id, num_pairs, num_chosen_tokens)
        loss.backward()
        for k, v in metrics.items():
            sums[k] += v
    metrics = {k: v / num_pairs for k, v in sums.items()}
    metrics["train/lr"] = sched.get_last_lr()[0]
    # with --mtp-detach the trunk and the MTP layers are clipped separately (see engines.core)
    groups = clip_groups(policy.named_parameters(), split=cfg.mtp_detach and policy.num_mtp_layers > 0)
    norms = clip_gradients(groups, functools.partial(clip_norm, max_norm=cfg.grad_clip))
    metrics.update(norm_metrics(norms, "train"))
    metrics["train/nan_skipped"] = float(not apply_update(opt, sched, norms))
    return metrics


# ---- the training loop -----------------------------------------------------------------------


def train_dpo(policy: MTPCausalLM, tokenizer, pairs: list[PreferencePair], cfg: DPOConfig,
              reference: MTPCausalLM | None = None, progress: bool = True,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """DPO-train `policy` in place on `pairs` and, when `cfg.out` is set, save it with the tokenizer.

    Pairs without reference log-probabilities are scored first, once, by `reference` (None: the policy
    itself before any update). Returns the last log window's per-pair means (loss/dpo, rewards/*,
    logps/*, kl/chosen, mtp/*, train/*) plus step and seconds. `on_step(step, metrics)` runs after
    every optimizer step."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unscored = [p for p in pairs if p.ref_chosen is None or p.ref_rejected is None]
    if unscored:
        score_reference(reference or policy, unscored, pad_id, max(cfg.batch_size, 16), progress)
    steps = plan_steps(len(pairs), cfg)
    opt, sched = build_optimizer(policy, cfg, len(steps))
    out = Path(cfg.out) if cfg.out else None
    done = _restore(out, policy, opt, sched, cfg) if out else 0
    log = None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out / METRICS_FILE, done)
    policy.train()
    final: dict[str, float] = {}
    window: dict[str, float] = defaultdict(float)
    window_steps, nan_streak, started = 0, 0, time.perf_counter()
    from tqdm import tqdm

    try:
        with DeferredInterrupt() as interrupt, tqdm(total=len(steps), initial=done, desc="dpo", unit="step",
                                                    disable=None if progress else True, dynamic_ncols=True) as bar:
            for step, micro in enumerate(steps[done:], done + 1):
                metrics = train_step(policy, opt, sched, [[pairs[i] for i in m] for m in micro], cfg, pad_id)
                nan_streak = nan_streak + 1 if metrics["train/nan_skipped"] else 0
                if nan_streak >= MAX_NAN_STREAK:
                    raise DPOError(f"the gradient was not finite for {nan_streak} steps in a row (step {step}); "
                                   f"lower --lr or --beta")
                for k, v in metrics.items():
                    window[k] += v
                window_steps += 1
                if step % cfg.log_every == 0 or step == len(steps):
                    final = {k: v / window_steps for k, v in window.items()}
                    window, window_steps = defaultdict(float), 0
                    if log:
                        log.write(step, final)
                    bar.set_postfix(loss=f"{final['loss/dpo']:.3f}", margin=f"{final['rewards/margins']:.3f}",
                                    acc=f"{final['rewards/accuracies']:.2f}")
                bar.update(1)
                if on_step:
                    on_step(step, metrics)
                due = (cfg.save_every and step % cfg.save_every == 0) or step == len(steps) or interrupt.requested
                if out and due:
                    core.save_checkpoint(out / CHECKPOINT_DIR, {"model": module_tensors(policy)}, opt, sched,
                                         {"step": step, "config": asdict(cfg)})
                if interrupt.requested:  # Ctrl-C: stopped at a step boundary, the checkpoint written
                    raise KeyboardInterrupt
    finally:
        if log:
            log.close()
    final.update(step=float(len(steps)), seconds=time.perf_counter() - started)
    policy.eval()
    if out:
        policy.save_pretrained(out)
        save_tokenizer(tokenizer, out)
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=1))
    return final


def _restore(out: Path, policy: MTPCausalLM, opt, sched, cfg: DPOConfig) -> int:
    """The steps already done by an earlier run into `out` (0: none, or --no-resume), its weights, AdamW and
    schedule restored. The reference log-probabilities are not in the checkpoint: the caller scores them
    again with the same initial reference, which gives the same numbers."""
    folder = core.find_checkpoint(out / CHECKPOINT_DIR) if cfg.resume else None
    if folder is None:
        if not cfg.resume:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        return 0
    saved, now = core.read_state(folder)["config"], asdict(cfg)
    for key in now.keys() - set(FREE_ON_RESUME):
        if saved.get(key) != now[key]:
            raise DPOError(f"{folder} was written with {_flag(key)} {saved.get(key)!r}, this run has {now[key]!r}: "
                           f"use the same options, another --out, or --no-resume to start over")
    try:
        load_module_tensors(policy, core.read_tensors(folder, "model"), folder)
    except CheckpointMismatch as e:
        raise DPOError(str(e)) from None
    done = core.load_checkpoint(folder, opt, sched)["step"]
    _say(f"resuming from {folder} at step {done}")
    return done


def save_tokenizer(tokenizer, out: Path) -> None:
    """Copy the tokenizer's own files when it was loaded from a folder (exactly what was trained on),
    else let transformers write them."""
    source = Path(getattr(tokenizer, "name_or_path", "") or "")
    if (source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file():
        from verl_mtp.data.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(source, out)
    else:
        tokenizer.save_pretrained(str(out))


def run(cfg: DPOConfig, progress: bool = True) -> dict[str, float]:
    """`verl-mtp dpo` without the argument parsing: load folders and data, score, train, save, evaluate."""
    from verl_mtp.models import CheckpointError
    from verl_mtp.trainer.setup import load_tokenizer, resolve_device

    cfg.check()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    try:
        policy = MTPCausalLM.from_pretrained(cfg.model, device=device)
        # the reference needs no MTP layers: it only scores
        reference = MTPCausalLM.from_pretrained(cfg.ref, num_mtp_layers=0, device=device) if cfg.ref else None
    except CheckpointError as e:
        raise DPOError(str(e)) from None
    for name, model in (("model", policy), ("ref", reference)):
        if model is not None and len(tokenizer) > model.config.vocab_size:
            raise DPOError(f"{_flag(name)}: vocabulary {model.config.vocab_size} < the tokenizer's {len(tokenizer)}")
    pairs, stats = load_pairs(cfg.data, tokenizer, cfg.max_len, cfg.skip_bad_rows)
    eval_pairs = load_pairs(cfg.eval_data, tokenizer, cfg.max_len, cfg.skip_bad_rows)[0] if cfg.eval_data else []
    _say(f"{stats['pairs']} pairs ({stats['truncated']} truncated, {stats['bad']} bad); policy "
         f"{policy.num_parameters():,} parameters, K={policy.num_mtp_layers} MTP layers; reference: "
         f"{cfg.ref or 'the initial policy'}")
    pad_id = tokenizer.pad_token_id
    # scored once, up front; then the reference model is dropped
    score_reference(reference or policy, pairs + eval_pairs, pad_id, max(cfg.batch_size, 16), progress)
    del reference
    result = train_dpo(policy, tokenizer, pairs, cfg, progress=progress)
    if eval_pairs:
        result.update({f"eval/{k}": v for k, v in evaluate_dpo(policy, eval_pairs, cfg.beta, pad_id).items()})
    return result


def _say(message: str) -> None:
    print(f"verl-mtp dpo: {message}", file=sys.stderr, flush=True)


# ---- command line ----------------------------------------------------------------------------


HELP = {
    "model": "HF/MiMo folder of the initial policy (e.g. the SFT output)",
    "data": "JSONL or parquet of {prompt, chosen, rejected}; prompt: string or chat messages",
    "out": "output HF folder (weights + tokenizer + dpo_metrics.jsonl)",
    "ref": "reference model folder (omitted: the initial policy)",
    "tokenizer": "HF tokenizer folder (omitted: the one in --model)",
    "eval_data": "preference pairs scored at the end (margin, accuracy)",
    "beta": "DPO temperature: reward = beta * (log pi - log pi_ref)",
    "kl_coef": "weight of the per-token k3 divergence from the reference on chosen tokens (0: off)",
    "mtp_scale": "weight of the MTP loss on the chosen responses (0: off)",
    "mtp_detach": "keep the MTP gradient off the trunk",
    "max_len": "max prompt + response tokens (responses are truncated)",
    "skip_bad_rows": "drop and count malformed rows instead of stopping",
    "epochs": "passes over the pairs", "max_steps": "stop after this many optimizer steps (0: no cap)",
    "batch_size": "pairs per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "schedule": "LR decay after linear warmup", "warmup_ratio": "fraction of the steps spent warming up",
    "min_lr_ratio": "final LR as a fraction of --lr", "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "max gradient norm (0: off)", "log_every": "steps per metrics line",
    "save_every": "steps between checkpoints in --out/checkpoint (0: only the last step)",
    "resume": "resume from --out/checkpoint if present (same options)",
    "device": "auto, cpu or cuda", "lr": "peak learning rate", "seed": "data order",
}
CHOICES = {"schedule": ("cosine", "constant")}


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="verl-mtp dpo", description=__doc__.splitlines()[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(DPOConfig):
        flag = _flag(f.name)
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP.get(f.name, " "))
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            ap.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name), help=HELP.get(f.name, " "))
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    threads, progress = args.pop("threads"), not args.pop("no_progress")
    if threads < 1:
        raise SystemExit(f"verl-mtp dpo: error: --threads must be >= 1 (got {threads})")
    torch.set_num_threads(threads)
    cfg = DPOConfig(**args)
    try:
        result = run(cfg, progress)
    except DPOError as e:
        raise SystemExit(f"verl-mtp dpo: error: {e}") from None
    except KeyboardInterrupt:
        where = f"; run the same command again to resume from {cfg.out}/{CHECKPOINT_DIR}" if cfg.out else ""
        raise SystemExit(f"verl-mtp dpo: interrupted{where}") from None
    keys = ("loss/dpo", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "kl/chosen",
            "mtp/acc_1", "eval/rewards/margins", "eval/rewards/accuracies")
    summary = [f"{result['step']:.0f} steps", f"{result['seconds']:.0f}s"]
    summary += [f"{k} {result[k]:.4g}" for k in keys if k in result]
    _say(f"saved {cfg.out}: " + ", ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
