"""Pretrain / SFT a small MTP model on a chat corpus: the stage before RL in the CPU quickstart.

    verl-mtp data data                       # data/{train,test}.parquet and data/sft.jsonl
    verl-mtp sft --data data/sft.jsonl --out checkpoints/sft

With the defaults (1.3M parameters, K=2, 4000 steps of 16 rows, lr 1e-3) the model learns the task's
arithmetic outright: on a clean corpus 99.8 % held-out greedy accuracy, after a sharp drop of the loss
between steps ~1800 and ~2500 (a 2000-step run stops in the middle of it at ~46 %, which is why
shorter runs vary so much from seed to seed). It learns a fallible teacher's slips just as faithfully,
which is what the quickstart's RL stage then removes (docs/benchmarks.md).

Rows are `{"prompt": [chat messages], "response": "..."}` (loss on the response and its EOS) or,
for plain pretraining, `{"text": "..."}` (loss on every token; `--loss-on all` does the same for
chat rows). The trunk learns the next token and K MTP layers learn tokens t+2..t+K+1, their loss
scaled by --mtp-scale. Unlike RL, where the MTP gradient is kept off the trunk, here it shapes the
trunk too unless --mtp-detach: the trunk is still learning what MTP heads want to read.

`--out DIR` ends as an HF/MiMo folder with the tokenizer next to the weights, ready for
`actor_rollout_ref.model.path=DIR`. `DIR/checkpoint/` holds the resumable state (model, optimizer,
LR schedule, EMA, data position, RNG): re-running the same command resumes, and Ctrl-C writes it
before exiting. Metrics go to `DIR/sft_metrics.jsonl`. When a `test.parquet` sits next to the data,
the final model's greedy accuracy and MTP accept length on it are measured and logged.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from verl_mtp.algos.mtp_loss import MTP_LOSS_TYPES, compute_mtp_loss
from verl_mtp.cli import OneLineParser
from verl_mtp.engines import core
from verl_mtp.engines.core import (CheckpointMismatch, DeferredInterrupt, MetricsLog, OptimConfig, apply_update,
                                   autocast, clip_gradients, clip_groups, clip_norm, compute_dtype, load_module_tensors,
                                   module_tensors, norm_metrics, pad_batch, read_state, read_tensors)
from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.models.moe import moe_metrics
from verl_mtp.trainer.evaluate import accuracy as evaluate_accuracy

METRICS_FILE = "sft_metrics.jsonl"
MAX_NAN_STREAK = 10  # consecutive non-finite gradients before giving up
CHECKPOINT_DIR = "checkpoint"
# files of an HF tokenizer folder, copied as they are (transformers versions disagree on how to re-save them)
# options that shape the model or the data a checkpoint was trained on: a resume must not change them
RESUME_KEYS = ("data", "init", "hidden", "layers", "heads", "kv_heads", "intermediate", "mtp_layers", "experts",
               "experts_per_token", "shared_experts", "moe_intermediate", "dense_layers", "moe_in_mtp",
               "tie_embeddings", "loss_on", "max_len", "val_size", "batch_size", "grad_accum", "seed")


class SFTError(ValueError):
    """A problem with the options, the data or the checkpoint that the user can fix; one line."""


@dataclass
class SFTConfig:
    """Every option of `verl-mtp sft` (field `kv_heads` is flag `--kv-heads`). Defaults: the CPU quickstart."""

    data: str = "data/sft.jsonl"
    out: str = "checkpoints/sft"
    tokenizer: str | None = None  # HF folder; None: the one already in `out`, else train one on the corpus
    init: str | None = None  # start from this HF/MiMo folder instead of a fresh model (e.g. SFT after pretraining)
    test_data: str | None = "auto"  # greedy accuracy at the end; "auto": test.parquet next to `data`; None: off
    # model (ignored with `init`, except mtp_layers)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    mtp_layers: int = 2
    tie_embeddings: bool = True
    # mixture of experts (DeepSeek style, see verl_mtp.models.moe); 0 experts: dense FFN
    experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 2  # top-k
    shared_experts: int = 0
    moe_intermediate: int = 0  # per expert; 0: --intermediate
    dense_layers: int = 0  # first trunk layers that keep the dense FFN
    moe_in_mtp: bool = True  # MTP layers use MoE too
    aux_loss_coef: float = 0.001  # load-balancing loss per MoE layer
    # objective
    loss_on: str = "response"  # "response": response tokens (and EOS) only; "all": every token
    mtp_scale: float = 0.3
    mtp_detach: bool = False
    mtp_loss: str = "ce"  # ce | soft_ce | tv, as actor_rollout_ref.model.mtp.loss_type (sampling at T=1)
    max_len: int = 128  # longer rows are truncated
    # optimisation
    steps: int = 4000  # optimizer steps
    batch_size: int = 16  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # 2e-3 trained faster but diverged late in 1 of 3 quickstart runs (docs/benchmarks.md)
    schedule: str = "cosine"  # "cosine" | "linear" | "constant", after linear warmup
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # matrices and embeddings only, not norms or biases
    grad_clip: float = 1.0  # 0: off
    ema: float = 0.0  # EMA decay of the weights (e.g. 0.99); the EMA is what is evaluated and saved; 0: off
    bf16: bool = False  # CPU autocast to bfloat16
    # validation, logging, checkpoints
    val_size: int = 256  # rows held out from the corpus for the validation loss; 0: no validation
    eval_every: int = 100
    patience: int = 0  # stop after this many evaluations without a better validation loss; 0: never
    log_every: int = 10
    save_every: int = 200
    resume: bool = True  # continue from `out/checkpoint` when there is one
    eval_limit: int = 256  # test prompts for the final accuracy; 0: all
    seed: int = 0

    def check(self) -> None:
        """Raise SFTError naming the first bad option as its flag."""
        rules = [
            ("loss_on", self.loss_on in ("response", "all"), "must be 'response' or 'all'"),
            ("mtp_loss", self.mtp_loss in MTP_LOSS_TYPES, f"must be one of {', '.join(MTP_LOSS_TYPES)}"),
            ("schedule", self.schedule in ("cosine", "linear", "constant"), "must be cosine, linear or constant"),
            ("hidden", self.hidden > 0, "must be > 0"), ("layers", self.layers > 0, "must be > 0"),
            ("heads", self.heads > 0, "must be > 0"), ("kv_heads", self.kv_heads > 0, "must be > 0"),
            ("intermediate", self.intermediate > 0, "must be > 0"), ("mtp_layers", self.mtp_layers >= 0, "must be >= 0"),
            ("heads", self.heads % max(self.kv_heads, 1) == 0, "must be a multiple of --kv-heads"),
            ("hidden", self.hidden % max(self.heads, 1) == 0 and (self.hidden // max(self.heads, 1)) % 2 == 0,
             "must be --heads times an even head size"),
            ("mtp_scale", self.mtp_scale >= 0, "must be >= 0"), ("max_len", self.max_len >= 2, "must be >= 2"),
            ("steps", self.steps > 0, "must be > 0"), ("batch_size", self.batch_size > 0, "must be > 0"),
            ("grad_accum", self.grad_accum > 0, "must be > 0"), ("lr", self.lr > 0, "must be > 0"),
            ("warmup", self.warmup >= 0, "must be >= 0"), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"), ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("ema", 0 <= self.ema < 1, "must be in [0, 1)"), ("val_size", self.val_size >= 0, "must be >= 0"),
            ("eval_every", self.eval_every > 0, "must be > 0"), ("patience", self.patience >= 0, "must be >= 0"),
            ("log_every", self.log_every > 0, "must be > 0"), ("save_every", self.save_every > 0, "must be > 0"),
            ("eval_limit", self.eval_limit >= 0, "must be >= 0"),
            ("experts", self.experts >= 0, "must be >= 0"),
            ("shared_experts", self.shared_experts >= 0, "must be >= 0"),
            ("experts_per_token", not self.experts or 1 <= self.experts_per_token <= self.experts,
             "must be in [1, --experts]"),
            ("moe_intermediate", self.moe_intermediate >= 0, "must be >= 0"),
            ("dense_layers", 0 <= self.dense_layers <= self.layers, "must be in [0, --layers]"),
            ("aux_loss_coef", self.aux_loss_coef >= 0, "must be >= 0"),
        ]
        for name, ok, requirement in rules:
            if not ok:
                raise SFTError(f"--{name.replace('_', '-')} {requirement} (got {getattr(self, name)!r})")
        if not Path(self.data).is_file():
            raise SFTError(f"--data {self.data}: no such file (write one with `verl-mtp data DIR`)")
        for name in ("tokenizer", "init"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise SFTError(f"--{name} {path}: no such folder")


# ---- data ------------------------------------------------------------------------------------


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target


def load_corpus(path: str, tokenizer, loss_on: str, max_len: int) -> tuple[list[Example], dict[str, int]]:
    """Tokenize a JSONL corpus. Bad rows are skipped and counted (the first one is named), never fatal
    unless nothing is left. Returns the examples and counts {rows, bad, truncated, too_long}."""
    prompts, responses, texts, bad, first_bad = [], [], [], 0, None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row, problem = _parse_row(line)
            if problem:
                bad, first_bad = bad + 1, first_bad or f"line {lineno}: {problem}"
            elif "text" in row:
                texts.append(row["text"])
            else:
                prompts.append(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False))
                responses.append(row["response"])
    encode = functools.partial(_encode_batch, tokenizer)
    # as the rollout sees them: prompt ids (chat template + generation prompt), then response ids + EOS
    pairs = [(p, r + [tokenizer.eos_token_id]) for p, r in zip(encode(prompts), encode(responses))]
    pairs += [([], t + [tokenizer.eos_token_id]) for t in encode(texts)]
    examples, truncated, too_long = [], 0, 0
    for prompt, response in pairs:
        ids = (prompt + response)[:max_len]
        mask = ([1] * len(prompt) if loss_on == "all" else [0] * len(prompt)) + [1] * len(response)
        truncated += len(prompt) + len(response) > max_len
        if sum(mask[1:len(ids)]) == 0:  # nothing left to learn from after truncation
            too_long += 1
            continue
        examples.append(Example(ids, mask[:len(ids)]))
    if bad:
        _say(f"skipped {bad} bad rows of {path} (first: {first_bad})")
    if not examples:
        raise SFTError(f"--data {path}: no usable rows" + (f" ({first_bad})" if first_bad else ""))
    stats = {"rows": len(examples), "bad": bad, "truncated": truncated, "too_long": too_long}
    return examples, stats


def _parse_row(line: str) -> tuple[dict, str | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return {}, f"not JSON ({e.msg})"
    if not isinstance(row, dict):
        return {}, "not a JSON object"
    if isinstance(row.get("text"), str):
        return row, None
    if isinstance(row.get("prompt"), str):
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    prompt = row.get("prompt")
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in prompt)):
        return {}, "'prompt' must be a non-empty list of {role, content} messages (or use a 'text' row)"
    if not isinstance(row.get("response"), str):
        return {}, "'response' must be a string"
    return row, None


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def split_validation(examples: list[Example], val_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    if val_size >= len(examples):
        raise SFTError(f"--val-size {val_size} leaves no training rows (the corpus has {len(examples)})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[val_size:]], [examples[i] for i in order[:val_size]]


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of rows of similar length, so padding wastes little compute: shuffle, sort within
    windows of 50 batches, cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window, batches = 50 * batch_size, []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lengths.__getitem__)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchStream:
    """Endless micro-batches, epoch after epoch. Each epoch's order is a function of (seed, epoch), so
    (epoch, cursor) is all a resume needs to continue with exactly the batches it would have seen."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.lengths = [len(e.ids) for e in examples]
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.cursor = epoch, cursor
        self._batches = self._epoch_batches(epoch)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return length_bucketed_batches(self.lengths, self.batch_size, random.Random(f"{self.seed}/{epoch}"))

    def next(self) -> list[int]:
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        self.cursor += 1
        return self._batches[self.cursor - 1]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask and loss_mask."""
    return pad_batch([e.ids for e in examples], [e.loss_mask for e in examples], pad_id)


# ---- model, loss, optimisation ---------------------------------------------------------------


def build_model(cfg: SFTConfig, tokenizer) -> MTPCausalLM:
    if cfg.init:
        model = MTPCausalLM.from_pretrained(cfg.init, num_mtp_layers=cfg.mtp_layers)
        if len(tokenizer) > model.config.vocab_size:
            raise SFTError(f"--init {cfg.init}: vocabulary {model.config.vocab_size} < tokenizer's {len(tokenizer)}")
        return model
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         num_nextn_predict_layers=cfg.mtp_layers, tie_word_embeddings=cfg.tie_embeddings,
                         max_position_embeddings=max(1024, cfg.max_len), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         n_routed_experts=cfg.experts, num_experts_per_tok=cfg.experts_per_token,
                         n_shared_experts=cfg.shared_experts, moe_intermediate_size=cfg.moe_intermediate or None,
                         first_k_dense_replace=cfg.dense_layers, moe_in_mtp=cfg.moe_in_mtp,
                         router_aux_loss_coef=cfg.aux_loss_coef)
    torch.manual_seed(cfg.seed)
    return MTPCausalLM(config)


def sft_loss(model: MTPCausalLM, ids: torch.Tensor, attention: torch.Tensor, loss_mask: torch.Tensor,
             mtp_scale: float, mtp_detach: bool, token_count: float, bf16: bool = False, mtp_loss: str = "ce"
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(LM loss, scaled MTP loss + MoE load-balancing loss, MTP and MoE metrics); the losses are sums over
    targets / `token_count`, so the micro-batches of one optimizer step add up to the step's per-token mean
    (the load-balancing loss is weighted by the micro-batch's share of the targets). `mtp_loss`: what each
    MTP depth is trained against (algos.mtp_loss); the metrics include the draft's expected acceptance
    against the model's own distribution sampled at T=1."""
    with autocast(ids.device, compute_dtype("bfloat16" if bf16 else "float32", ids.device, "--bf16")):
        out = model(ids, attention, mtp_detach=mtp_detach)
    target_mask = loss_mask[:, 1:].float()
    ce = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    lm = (ce * target_mask.flatten()).sum() / token_count
    mtp, metrics = compute_mtp_loss(out.mtp_logits, ids, loss_mask, mtp_scale, token_count, policy_logits=out.logits,
                                    loss_type=mtp_loss)
    if out.moe_stats is not None:
        mtp = mtp + out.aux_loss * (float(target_mask.sum()) / token_count)
        metrics.update(moe_metrics(out.aux_loss, out.moe_stats))
    return lm, mtp, metrics


def optim_config(cfg: SFTConfig) -> OptimConfig:
    """AdamW with betas (0.9, 0.95), weight decay on matrices and embeddings only."""
    return OptimConfig(lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, decay_vectors=False,
                       schedule=cfg.schedule, warmup_steps=cfg.warmup, total_steps=cfg.steps,
                       min_lr_ratio=cfg.min_lr_ratio, clip_grad=cfg.grad_clip)


def build_optimizer(model: MTPCausalLM, cfg: SFTConfig):
    return core.build_optimizer(model.parameters(), optim_config(cfg))


class EMA:
    """Exponential moving average of the weights in a shadow copy of the model. The decay ramps up as
    min(decay, (1 + n) / (10 + n)) over the first updates, so the random initial weights fade out fast."""

    def __init__(self, model: MTPCausalLM, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: MTPCausalLM) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(p, 1.0 - d)
        self.updates += 1


# ---- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(folder: Path, model, opt, sched, ema: EMA | None, progress: dict, cfg: SFTConfig) -> None:
    """The core's atomic checkpoint: model (and EMA) tensors, AdamW, schedule, RNG, progress and options."""
    tensors = {"model": module_tensors(model), **({"ema": module_tensors(ema.model)} if ema is not None else {})}
    state = {**progress, "ema_updates": ema.updates if ema else 0, "config": asdict(cfg)}
    core.save_checkpoint(folder, tensors, opt, sched, state)


def find_checkpoint(out: Path) -> Path | None:
    return core.find_checkpoint(out / CHECKPOINT_DIR)


def load_checkpoint(folder: Path, model, opt, sched, ema: EMA | None, cfg: SFTConfig) -> dict:
    saved = read_state(folder)["config"]
    for key in RESUME_KEYS:
        if saved.get(key, getattr(SFTConfig, key, None)) != getattr(cfg, key):  # older checkpoints: the default
            flag = f"--{key.replace('_', '-')}"
            raise SFTError(f"{folder} was written with {flag} {saved.get(key)!r}, this run has {getattr(cfg, key)!r}: "
                           f"use the same options, another --out, or --no-resume to start over")
    try:
        load_module_tensors(model, read_tensors(folder, "model"), folder)
        if ema is not None:
            load_module_tensors(ema.model, read_tensors(folder, "ema") or module_tensors(model), folder)
    except CheckpointMismatch as e:
        raise SFTError(str(e)) from None
    state = core.load_checkpoint(folder, opt, sched)
    state.pop("config")
    ema_updates = state.pop("ema_updates")
    if ema is not None:
        ema.updates = ema_updates
    return state


# ---- tokenizer -------------------------------------------------------------------------------


def prepare_tokenizer(cfg: SFTConfig, out: Path):
    """The tokenizer, installed in `out` so the final folder is self-contained: copied from --tokenizer,
    reused from an earlier run into `out`, or trained on the corpus (a 512-token BPE)."""
    from verl_mtp.data.tokenizer import copy_tokenizer_files, train_tokenizer
    from verl_mtp.trainer.setup import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer:
        copy_tokenizer_files(cfg.tokenizer, out)
    elif not (out / "tokenizer.json").is_file():
        train_tokenizer(_corpus_texts(cfg.data), str(out))
    return load_tokenizer(str(out))


def _corpus_texts(path: str):
    """Each turn as the chat template lays it out (role name, newline, content), for tokenizer training."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            row, problem = _parse_row(line) if line.strip() else ({}, "empty")
            if problem:
                continue
            if "text" in row:
                yield row["text"]
                continue
            yield from (f"{m['role']}\n{m['content']}" for m in row["prompt"])
            yield f"assistant\n{row['response']}"


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model: MTPCausalLM, batches: list[tuple[torch.Tensor, ...]], cfg: SFTConfig) -> dict[str, float]:
    """Per-token LM and MTP losses over the held-out rows (each micro-batch weighted by its targets)."""
    was_training = model.training
    model.eval()
    total, lm_sum, mtp_sums = 0.0, 0.0, defaultdict(float)
    for ids, attention, loss_mask in batches:
        n = float(loss_mask[:, 1:].sum())
        lm, _, metrics = sft_loss(model, ids, attention, loss_mask, 1.0, False, n, cfg.bf16, cfg.mtp_loss)
        total, lm_sum = total + n, lm_sum + float(lm) * n
        for k, v in metrics.items():
            mtp_sums[k] += v * n
    model.train(was_training)
    return {"val/loss": lm_sum / total, **{f"val/{k}": v / total for k, v in mtp_sums.items()}}


def _test_path(cfg: SFTConfig) -> str | None:
    if cfg.test_data == "auto":
        beside = Path(cfg.data).with_name("test.parquet")
        return str(beside) if beside.is_file() else None
    if cfg.test_data and not Path(cfg.test_data).is_file():
        raise SFTError(f"--test-data {cfg.test_data}: no such file")
    return cfg.test_data or None


# ---- the training loop -----------------------------------------------------------------------


class _Window:
    """Averages of the per-step metrics since the last log line, and the token rate over it."""

    def __init__(self):
        self.sums, self.steps, self.tokens, self.started = defaultdict(float), 0, 0, time.perf_counter()

    def add(self, metrics: dict[str, float], tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] += v
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def flush(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.started
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        out["perf/tokens_per_s"] = self.tokens / max(seconds, 1e-9)
        self.__init__()
        return out


def train_step(model, opt, sched, micro_batches: list[tuple[torch.Tensor, ...]], cfg: SFTConfig) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation). A non-finite gradient skips the
    update (reported as train/nan_skipped = 1) rather than poisoning the weights."""
    token_count = float(sum(float(m[2][:, 1:].sum()) for m in micro_batches))
    sums = defaultdict(float)
    for ids, attention, loss_mask in micro_batches:
        lm, mtp, metrics = sft_loss(model, ids, attention, loss_mask, cfg.mtp_scale, cfg.mtp_detach, token_count, cfg.bf16,
                                    cfg.mtp_loss)
        (lm + mtp).backward()
        sums["train/loss"] += float(lm.detach())
        for k, v in metrics.items():
            sums[k] += v / len(micro_batches)
    sums["train/lr"] = sched.get_last_lr()[0]
    # with --mtp-detach the trunk and the MTP layers are clipped separately (see engines.core)
    groups = clip_groups(model.named_parameters(), split=cfg.mtp_detach and model.num_mtp_layers > 0)
    norms = clip_gradients(groups, functools.partial(clip_norm, max_norm=cfg.grad_clip))
    sums.update(norm_metrics(norms, "train"))
    sums["train/nan_skipped"] = float(not apply_update(opt, sched, norms))
    return dict(sums)


class SFTTrainer:
    """One run: `__init__` builds everything from the config (tokenizer, data, model, optimizer) and
    restores the checkpoint in `out` if there is one; `run()` trains to `cfg.steps` and saves."""

    def __init__(self, cfg: SFTConfig):
        cfg.check()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.test_path = _test_path(cfg)
        self.tokenizer = prepare_tokenizer(cfg, self.out)
        examples, data_stats = load_corpus(cfg.data, self.tokenizer, cfg.loss_on, cfg.max_len)
        self.train_rows, val_rows = split_validation(examples, cfg.val_size, cfg.seed)
        self.pad_id = self.tokenizer.pad_token_id
        self.val_batches = [collate([val_rows[i] for i in b], self.pad_id) for b in
                            length_bucketed_batches([len(e.ids) for e in val_rows], 64, random.Random(0))]
        self.model = build_model(cfg, self.tokenizer).train()
        self.opt, self.sched = build_optimizer(self.model, cfg)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.state = {"step": 0, "epoch": 0, "cursor": 0, "best_val": None, "bad_evals": 0, "stopped_early": False,
                      "nan_skipped": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self._restore()
        self.stream = BatchStream(self.train_rows, cfg.batch_size, cfg.seed, self.state["epoch"], self.state["cursor"])
        self.metrics: dict[str, float] = {}
        _say(f"{len(self.train_rows)} training rows ({data_stats['truncated']} truncated, {data_stats['bad']} bad, "
             f"{data_stats['too_long']} too long), {len(val_rows)} held out; model {self.model.num_parameters():,} "
             f"parameters ({self.model.num_parameters(active=True):,} active), "
             f"K={self.model.num_mtp_layers} MTP layers")

    @property
    def eval_model(self) -> MTPCausalLM:
        """What is validated, tested and saved: the EMA weights when EMA is on."""
        return self.ema.model if self.ema else self.model

    def _restore(self) -> None:
        checkpoint = find_checkpoint(self.out) if self.cfg.resume else None
        if checkpoint:
            self.state = load_checkpoint(checkpoint, self.model, self.opt, self.sched, self.ema, self.cfg)
            _say(f"resuming from {checkpoint} at step {self.state['step']}")
        elif not self.cfg.resume:
            shutil.rmtree(self.out / CHECKPOINT_DIR, ignore_errors=True)

    def run(self, progress: bool = True, on_step: Callable[[int, dict[str, float]], None] | None = None
            ) -> dict[str, float]:
        self._started, self._cpu_started = time.perf_counter(), time.process_time()
        self._tokens, self._nan_streak = 0, 0
        self.log = MetricsLog(self.out / METRICS_FILE, self.state["step"])
        try:
            interrupted = self._train(progress, on_step)
            self.metrics.update(step=float(self.state["step"]), **self._elapsed(), interrupted=float(interrupted),
                                stopped_early=float(self.state["stopped_early"]),
                                nan_skipped_steps=float(self.state["nan_skipped"]))
            if self._tokens:
                self.metrics["perf/tokens_per_s"] = self._tokens / max(time.perf_counter() - self._started, 1e-9)
            if not interrupted:
                self._finish()
        finally:
            self.log.close()
        return self.metrics

    def _train(self, progress: bool, on_step) -> bool:
        """The step loop; True when stopped by Ctrl-C (after saving a checkpoint)."""
        from tqdm import tqdm

        cfg = self.cfg
        with DeferredInterrupt() as interrupt, tqdm(total=cfg.steps, initial=self.state["step"], desc="sft",
                                                    unit="step", disable=None if progress else True,
                                                    dynamic_ncols=True) as bar:
            self._window, self._bar = _Window(), bar
            while self.state["step"] < cfg.steps and not self.state["stopped_early"]:
                step_metrics = self._step()
                step = self.state["step"]
                self._log_and_validate(step)
                if step % cfg.save_every == 0 or step == cfg.steps or self.state["stopped_early"]:
                    self.save()
                bar.update(1)
                if on_step:
                    on_step(step, step_metrics)
                if interrupt.requested:
                    self.save()
                    return True
        return False

    def _step(self) -> dict[str, float]:
        micro = [collate([self.train_rows[i] for i in self.stream.next()], self.pad_id)
                 for _ in range(self.cfg.grad_accum)]
        metrics = train_step(self.model, self.opt, self.sched, micro, self.cfg)
        self.state["step"] += 1
        self.state["nan_skipped"] += int(metrics["train/nan_skipped"])
        self._nan_streak = self._nan_streak + 1 if metrics["train/nan_skipped"] else 0
        if self._nan_streak >= MAX_NAN_STREAK:
            raise SFTError(f"the gradient was not finite for {self._nan_streak} steps in a row (step "
                           f"{self.state['step']}); lower --lr or turn off --bf16")
        if self.ema:
            self.ema.update(self.model)
        tokens = sum(int(m[1].sum()) for m in micro)
        self._tokens += tokens
        self._window.add(metrics, tokens)
        return metrics

    def _log_and_validate(self, step: int) -> None:
        cfg, last = self.cfg, step == self.cfg.steps
        if step % cfg.log_every == 0 or last:
            train = self._window.flush()
            self.metrics.update(train)
            self.log.write(step, {**train, "epoch": self.stream.epoch})
            self._bar.set_postfix(loss=f"{self.metrics['train/loss']:.3f}", lr=f"{self.metrics['train/lr']:.2e}")
        if self.val_batches and (step % cfg.eval_every == 0 or last):
            val = validation_loss(self.eval_model, self.val_batches, cfg)
            self.metrics.update(val)
            self.log.write(step, val)
            self._bar.write(f"step {step}: " + "  ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in val.items()))
            self.state["stopped_early"] = _early_stop(self.state, val["val/loss"], cfg.patience)

    def _elapsed(self) -> dict[str, float]:
        """Wall and CPU time of the training loop, summed over resumed runs."""
        return {"seconds": self.state["seconds"] + time.perf_counter() - self._started,
                "cpu_seconds": self.state["cpu_seconds"] + time.process_time() - self._cpu_started}

    def save(self) -> None:
        state = {**self.state, "epoch": self.stream.epoch, "cursor": self.stream.cursor, **self._elapsed()}
        save_checkpoint(self.out / CHECKPOINT_DIR, self.model, self.opt, self.sched, self.ema, state, self.cfg)

    def _finish(self) -> None:
        """The HF folder (the tokenizer is already there), then the test accuracy when a test set is set."""
        self.eval_model.save_pretrained(self.out)
        if self.state["stopped_early"]:
            _say(f"early stop at step {self.state['step']}: no better val/loss in {self.cfg.patience} evaluations")
        if self.test_path:
            try:
                test = evaluate_accuracy(self.eval_model, self.tokenizer, self.test_path, limit=self.cfg.eval_limit)
            except ValueError as e:  # an empty test file
                raise SFTError(str(e)) from None
            self.metrics.update({f"test/{k}": v for k, v in test.items()})
            self.log.write(self.state["step"], {f"test/{k}": v for k, v in test.items()})
        self.log.write(self.state["step"], {"final": True, **self.metrics})


def train_sft(cfg: SFTConfig, progress: bool = True,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train (or resume) per `cfg` and save the final HF folder in `cfg.out`. Returns the final metrics:
    step, train/loss, mtp/loss_k, mtp/acc_k (last log window), val/* (last validation), test/* (when a
    test set is found), perf/tokens_per_s, seconds, cpu_seconds, and flags interrupted / stopped_early.
    `on_step(step, metrics)` is called after every optimizer step. Ctrl-C saves a checkpoint and returns
    with interrupted=1; calling again with the same config resumes."""
    return SFTTrainer(cfg).run(progress, on_step)


def _early_stop(progress_state: dict, val_loss: float, patience: int) -> bool:
    best = progress_state["best_val"]
    if best is None or val_loss < best:
        progress_state["best_val"], progress_state["bad_evals"] = val_loss, 0
    else:
        progress_state["bad_evals"] += 1
    return patience > 0 and progress_state["bad_evals"] >= patience


def _say(message: str) -> None:
    print(f"verl-mtp sft: {message}", file=sys.stderr, flush=True)


# ---- command line ----------------------------------------------------------------------------


HELP = {
    "data": "JSONL corpus: {prompt: [messages], response} or {text} rows",
    "out": "output HF folder (weights + tokenizer); its checkpoint/ makes re-runs resume",
    "tokenizer": "HF tokenizer folder (none: the one in --out, else train a BPE on the corpus)",
    "init": "start from this HF/MiMo folder instead of a fresh model (model-size flags then unused)",
    "test_data": "parquet for the final greedy accuracy ('auto': test.parquet next to --data; 'none': off)",
    "loss_on": "train on response tokens only, or on every token (pretraining)",
    "mtp_scale": "weight of the MTP loss", "mtp_detach": "keep the MTP gradient off the trunk",
    "mtp_loss": "MTP objective: ce (the next tokens), soft_ce (the model's own detached distribution there) or "
                "tv (1 - sum min(p, q), one minus the draft's acceptance at T=1)",
    "max_len": "truncate rows to this many tokens", "steps": "optimizer steps",
    "batch_size": "rows per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "schedule": "LR decay after linear warmup", "warmup": "warmup steps",
    "min_lr_ratio": "final LR as a fraction of --lr", "grad_clip": "max gradient norm (0: off)",
    "ema": "EMA decay of the weights, used for eval and saving (0: off)", "bf16": "CPU bfloat16 autocast",
    "val_size": "held-out rows for the validation loss (0: off)", "eval_every": "steps between validations",
    "patience": "early stop after this many validations without improvement (0: off)",
    "save_every": "steps between checkpoints", "eval_limit": "test prompts for the final accuracy (0: all)",
    "tie_embeddings": "share input embeddings and LM head", "resume": "resume from --out/checkpoint if present",
    "experts": "routed experts per MoE layer (0: dense FFN)", "experts_per_token": "routed experts per token (top-k)",
    "shared_experts": "always-on experts per MoE layer", "moe_intermediate": "expert FFN size (0: --intermediate)",
    "dense_layers": "first trunk layers that keep the dense FFN", "moe_in_mtp": "MoE in the MTP layers too",
    "aux_loss_coef": "load-balancing loss coefficient per MoE layer",
    "hidden": "hidden size", "layers": "trunk decoder layers", "heads": "attention heads",
    "kv_heads": "key/value heads (grouped-query attention)", "intermediate": "MLP size",
    "mtp_layers": "MTP layers K (MiMo num_nextn_predict_layers)", "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay of matrices and embeddings", "log_every": "steps between metric lines",
    "seed": "seed of the initial weights, the data order and the validation split",
}
CHOICES = {"loss_on": ("response", "all"), "schedule": ("cosine", "linear", "constant"), "mtp_loss": MTP_LOSS_TYPES}


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="verl-mtp sft", description=__doc__.splitlines()[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(SFTConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            ap.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name),
                            help=HELP[f.name])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a tiny model gains little from more, and OpenMP threads collapse when other processes share the cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    threads = args.pop("threads")
    if threads < 1:
        raise SystemExit(f"verl-mtp sft: error: --threads must be >= 1 (got {threads})")
    if str(args["test_data"]).lower() in ("none", ""):
        args["test_data"] = None
    cfg = SFTConfig(**args)
    try:
        cfg.check()
        torch.set_num_threads(threads)
        metrics = train_sft(cfg)
    except SFTError as e:
        raise SystemExit(f"verl-mtp sft: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"verl-mtp sft: interrupted; the last checkpoint is in {cfg.out}/{CHECKPOINT_DIR}") from None
    if metrics["interrupted"]:
        _say(f"interrupted at step {metrics['step']:.0f}: checkpoint saved in {cfg.out}/{CHECKPOINT_DIR}; "
             f"run the same command again to resume")
        return 130
    summary = [f"step {metrics['step']:.0f}", f"{metrics['seconds']:.0f}s"]
    summary += [f"{k} {metrics[k]:.4g}" for k in ("train/loss", "val/loss", "val/mtp/acc_1", "test/acc",
                                                  "test/accept_length") if k in metrics]
    _say(f"saved {cfg.out}: " + ", ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
