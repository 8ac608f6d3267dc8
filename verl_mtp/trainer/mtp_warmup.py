"""MTP warm start: train a base model's MTP layers on its own frozen trunk before RL.

    verl-mtp mtp-warmup --model BASE --data CORPUS --out RUN [--num-mtp-layers K] [--objective ce|soft|tv|diffusion]

RL starts from a model whose MTP heads are missing (most checkpoints) or weak, and a weak draft makes
speculative rollout slower, not faster. This stage (what MiMo, EAGLE-3 and SpecForge users run first):

  1. reads a corpus (text, JSONL, parquet, or `self`: the RL prompts answered by the model itself);
  2. collects the frozen trunk's last hidden states, greedy next tokens (and top-k distribution for
     soft labels) into safetensors shards with a manifest, resumable (or computes them on the fly);
  3. trains the K MTP layers on them with the trunk frozen, extra layers initialised from the first;
  4. reports per predicted position accuracy and loss (mean and std across eval batches) and the
     accept length of speculative decoding with the rollout engine on held-out prompts, before and
     after, to RUN/mtp_warmup_report.{md,json}; saves the model to RUN/model (HF/MiMo folder).

`warm_start(model, tokenizer, corpus, config)` runs steps 2-4 in-process (the quickstart uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from verl_mtp.data.tokenizer import copy_tokenizer_files
from verl_mtp.engines import core
from verl_mtp.engines.core import (OptimConfig, apply_update, build_optimizer, clip_gradients, clip_norm,
                                   load_module_tensors, module_tensors)
from verl_mtp.trainer.mtp_warmup_data import (FORMATS, HIDDEN_DTYPES, CollectSettings, Document, OnTheFlySource,
                                              ShardSource, WarmupError, collect, corpus_digest, detect_format,
                                              prepare_documents, read_corpus, read_manifest, read_prompts,
                                              self_generate, trunk_fingerprint, write_documents)
from verl_mtp.trainer.mtp_warmup_objectives import (ALPHA_SCHEDULES, LABELS, LOSS_WEIGHTS, OBJECTIVES, chain_loss,
                                                    diffusion_eval, diffusion_loss)

REPORT_NAME = "mtp_warmup_report"
CHECKPOINT_DIR = "checkpoint"
SOFT_TARGETS = ("soft", "tv")  # objectives trained against the trunk's stored top-k distribution


def _opt(default, help: str, choices: Sequence | None = None, kind=None, valid: str | None = None):
    """A config field that is also a CLI flag (--field-name). `kind`: its type when the default is None;
    `valid`: the accepted range, one of _RANGES (None values, i.e. unset limits, always pass)."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind, "valid": valid})


_RANGES = {
    ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 3": lambda v: v >= 3, "> 0": lambda v: v > 0,
    "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1)": lambda v: 0 < v < 1,
}


@dataclass
class WarmupConfig:
    """Every setting of the warm start; each one is the CLI flag of the same name."""

    objective: str = _opt("ce", "ce: hard-label CE per depth; soft: KL to the trunk's distribution (RL's "
                                "soft_ce); tv: 1 - sum min(p, q), one minus the draft's acceptance at T=1; "
                                "diffusion: masked block denoising", OBJECTIVES)
    labels: str = _opt("trunk", "hard labels: the trunk's greedy tokens (what a greedy verifier accepts) "
                                "or the corpus tokens", LABELS)
    collect: bool = _opt(True, "collect trunk features to shards first (else compute them on the fly)")
    sample_size: int = _opt(512, "tokens per training window", valid=">= 3")
    stride: int = _opt(256, "tokens between window starts in a document", valid=">= 1")
    max_samples: int | None = _opt(None, "stop collecting after this many windows", kind=int, valid=">= 1")
    max_length: int | None = _opt(None, "truncate documents to this many tokens (default: the model's "
                                        "max_position_embeddings)", kind=int, valid=">= 3")
    hidden_dtype: str = _opt("bfloat16", "dtype of the stored hidden states", tuple(HIDDEN_DTYPES))
    shard_size: int = _opt(1024, "windows per shard (a shard holds whole batches of documents)", valid=">= 1")
    collect_batch_size: int = _opt(8, "documents per trunk pass during collection", valid=">= 1")
    topk: int = _opt(32, "stored target probabilities per position for --objective soft / tv", valid=">= 1")
    batch_size: int = _opt(16, "windows per training step", valid=">= 1")
    epochs: int = _opt(1, "passes over the training windows (ignored when --steps is set)", valid=">= 1")
    steps: int = _opt(0, "optimizer steps (0: from --epochs)", valid=">= 0")
    lr: float = _opt(2e-4, "peak learning rate (AdamW)", valid="> 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay", valid=">= 0")
    warmup_steps: int = _opt(20, "linear warmup steps, then cosine decay", valid=">= 0")
    min_lr_ratio: float = _opt(0.1, "final lr / peak lr of the cosine decay", valid="in [0, 1]")
    clip_grad: float = _opt(1.0, "gradient norm clip", valid="> 0")
    first_layer_fraction: float = _opt(0.3, "when no MTP layer is trained yet: share of steps that train "
                                            "layer 0 alone before it is copied into the others (MiMo)",
                                       valid="in [0, 1)")
    block_length: int = _opt(4, "diffusion: future tokens per block (L)", valid=">= 1")
    alpha_schedule: str = _opt("linear", "diffusion: alpha(s) = 1 - s (linear) or cos(pi s / 2) (kappa)",
                               ALPHA_SCHEDULES)
    time_epsilon: float = _opt(0.01, "diffusion: s ~ U[time_epsilon, 1)", valid="in (0, 1)")
    loss_weight: str = _opt("scheduler", "diffusion: -alpha'(s)/(1 - alpha(s)) weights or ones", LOSS_WEIGHTS)
    eval_fraction: float = _opt(0.05, "share of documents held out for evaluation", valid="in (0, 1)")
    eval_batches: int = _opt(50, "at most this many eval batches per evaluation", valid=">= 1")
    accept_prompts: int = _opt(32, "held-out prompts for the accept-length measurement", valid=">= 0")
    accept_max_new_tokens: int = _opt(64, "tokens generated per held-out prompt", valid=">= 1")
    eval_temperature: float = _opt(0.0, "sampling temperature of the accept-length measurement (0: greedy)",
                                   valid=">= 0")
    self_temperature: float = _opt(1.0, "--format self: temperature of the model's own answers", valid=">= 0")
    self_max_new_tokens: int = _opt(256, "--format self: longest answer", valid=">= 1")
    log_every: int = _opt(50, "print training metrics every this many steps", valid=">= 1")
    save_every: int = _opt(200, "steps between checkpoints in OUT/checkpoint (0: only the last step); a re-run "
                                "with the same settings resumes from it", valid=">= 0")
    seed: int = _opt(0, "seed of shuffling, masking and sampling")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, choices, valid = getattr(self, f.name), f.metadata["choices"], f.metadata["valid"]
            flag = "--" + f.name.replace("_", "-")
            if choices and value not in choices:
                raise WarmupError(f"{f.name}={value!r} ({flag}): expected one of {', '.join(choices)}")
            if valid and value is not None and not _RANGES[valid](value):
                raise WarmupError(f"{f.name}={value!r} ({flag}): must be {valid}")

    @property
    def eval_every(self) -> int:
        return max(2, round(1 / self.eval_fraction))


# ---- the warm start --------------------------------------------------------------------------------

def warm_start(model, tokenizer, corpus, config: WarmupConfig | None = None, *, run_dir: str | Path | None = None,
               data_dir: str | Path | None = None, trained_mtp_layers: int = 0,
               log: Callable[[str], None] = print, **overrides) -> tuple[object, dict]:
    """Train `model`'s MTP layers on its frozen trunk; returns (the same model, report dict).

    corpus: texts, token lists or Documents (the tokenizer is needed for texts), or a ShardSource of a
        finished collection. trained_mtp_layers: how many of the model's MTP layers hold trained weights
        (0 for a base model): layers past them start as copies of layer 0, and with none trained layer 0
        first trains alone for `first_layer_fraction` of the steps (MiMo's recipe).
    run_dir: where the report (and, when collecting without `data_dir`, the shards) go; None keeps
        nothing on disk. Overrides are WarmupConfig fields.
    """
    cfg = dataclasses.replace(config or WarmupConfig(), **overrides)
    if model.num_mtp_layers == 0:
        raise WarmupError("the model has no MTP layers to train (load it with num_mtp_layers=K)")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as scratch:
        source = _source(model, tokenizer, corpus, cfg, run_dir, data_dir, scratch, log)
        return _run(model, tokenizer, source, cfg, run_dir, trained_mtp_layers, log)


def _source(model, tokenizer, corpus, cfg: WarmupConfig, run_dir, data_dir, scratch: str, log):
    if isinstance(corpus, ShardSource):
        _check_trunk(corpus, model)
        return corpus
    docs = prepare_documents(corpus, tokenizer)
    max_length = cfg.max_length or model.config.max_position_embeddings
    topk = cfg.topk if cfg.objective in SOFT_TARGETS else 0
    if topk > model.config.vocab_size:
        raise WarmupError(f"topk={topk} (--topk) exceeds the vocabulary ({model.config.vocab_size})")
    if not cfg.collect:
        return OnTheFlySource(model, docs, cfg.eval_every, cfg.sample_size, cfg.stride, cfg.max_samples,
                              max_length, topk)
    folder = Path(data_dir or (Path(run_dir) / "data" if run_dir else scratch))
    settings = CollectSettings(trunk=trunk_fingerprint(model), corpus=corpus_digest(docs), num_docs=len(docs),
                               sample_size=cfg.sample_size, stride=cfg.stride, max_samples=cfg.max_samples,
                               max_length=max_length, hidden_dtype=cfg.hidden_dtype, topk=topk,
                               shard_size=cfg.shard_size, docs_per_batch=cfg.collect_batch_size)
    collect(model, docs, folder, settings, log)
    return ShardSource(folder, cfg.eval_every)


def _check_trunk(source: ShardSource, model) -> None:
    if source.settings["trunk"] != trunk_fingerprint(model):
        raise WarmupError(f"{source.folder}: collected from a different trunk than this model's")


def _run(model, tokenizer, source, cfg: WarmupConfig, run_dir, trained_mtp_layers: int, log) -> tuple[object, dict]:
    if cfg.objective in SOFT_TARGETS and not source.topk:
        raise WarmupError(f"--objective {cfg.objective} needs top-k targets; this collection has none (collect "
                          f"again with --objective {cfg.objective})")
    n_train, n_eval = source.num_samples("train"), source.num_samples("eval")
    if not n_train or not n_eval:
        raise WarmupError(f"{n_train} training and {n_eval} held-out windows; need both (more documents, or a "
                          f"different --eval-fraction)")
    prompts = held_out_prompts(source.eval_documents(), cfg.accept_prompts)
    eos = _eos_ids(tokenizer, model)
    mask_embedding = _mask_embedding(model) if cfg.objective == "diffusion" else None
    log(f"warm start: {model.num_mtp_layers} MTP layers, objective {cfg.objective}, {n_train} train / "
        f"{n_eval} held-out windows, {len(prompts)} held-out prompts")
    before = {"positions": evaluate(model, source, cfg, mask_embedding),
              "accept": measure_accept_length(model, prompts, cfg, eos)}
    log(f"before: accept length {before['accept']['accept_length']:.3f}")
    t0 = time.perf_counter()
    checkpoint = Path(run_dir) / CHECKPOINT_DIR if run_dir is not None else None
    train = train_mtp_layers(model, source, cfg, trained_mtp_layers, mask_embedding, n_train, log, checkpoint)
    train["seconds"] = round(time.perf_counter() - t0, 2)
    after = {"positions": evaluate(model, source, cfg, mask_embedding),
             "accept": measure_accept_length(model, prompts, cfg, eos)}
    report = {"objective": cfg.objective, "num_mtp_layers": model.num_mtp_layers, "train_samples": n_train,
              "eval_samples": n_eval, "train": train, "before": before, "after": after,
              "config": dataclasses.asdict(cfg)}
    if mask_embedding is not None:
        report["mask_embedding"] = mask_embedding.detach().cpu()
    if run_dir is not None:
        write_report(report, Path(run_dir))
    log(format_report(report))
    return model, report


def _mask_embedding(model) -> torch.nn.Parameter:
    """The diffusion objective's [MASK] input: starts at the mean token embedding, a neutral point."""
    weight = model.model.embed_tokens.weight.detach()
    return torch.nn.Parameter(weight.float().mean(0).to(weight.dtype).clone())


def _eos_ids(tokenizer, model) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos = model.config.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# ---- training --------------------------------------------------------------------------------------

def _copy_first_layer(model, start: int) -> None:
    first = model.model.mtp_layers[0].state_dict()
    with torch.no_grad():
        for layer in model.model.mtp_layers[start:]:
            layer.load_state_dict(first)


def train_mtp_layers(model, source, cfg: WarmupConfig, trained_mtp_layers: int, mask_embedding, n_train: int,
                     log, checkpoint: Path | None = None) -> dict:
    """AdamW over the MTP layers (and the mask embedding) with warmup + cosine (the training core's). The
    trunk, embeddings and LM head have requires_grad=False meanwhile, so no gradient is ever computed for
    them. A non-finite loss or gradient norm skips the update (counted in nonfinite_skipped). With
    `checkpoint` (a folder) the training core's checkpoint is written there every `save_every` steps and at
    the end, and a run with the same settings resumes from it bit for bit."""
    k = model.num_mtp_layers
    total = cfg.steps or cfg.epochs * math.ceil(n_train / cfg.batch_size)
    chain = cfg.objective != "diffusion"
    solo_steps = int(cfg.first_layer_fraction * total) if chain and trained_mtp_layers == 0 and k > 1 else 0
    if trained_mtp_layers > 0:
        _copy_first_layer(model, trained_mtp_layers)
    params = list(model.model.mtp_layers.parameters()) + ([mask_embedding] if mask_embedding is not None else [])
    opt, schedule = build_optimizer(params, OptimConfig(
        lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, schedule="cosine",
        warmup_steps=min(cfg.warmup_steps, total // 2), total_steps=total, min_lr_ratio=cfg.min_lr_ratio,
        clip_grad=cfg.clip_grad))
    g = torch.Generator().manual_seed(cfg.seed)
    progress = {"step": 0, "skipped": 0, "batches": 0}
    if checkpoint is not None:
        progress = _restore(checkpoint, model, mask_embedding, g, opt, schedule, cfg, log) or progress
    step, skipped, consumed, last = progress["step"], progress["skipped"], progress["batches"], {}
    # a resumed run continues the same endless stream after the batches it had consumed
    stream = itertools.islice(_endless(source, cfg, model.lm_head.weight.device), consumed, None)
    with _only_trainable(model, params):
        for batch in stream if step < total else ():
            consumed += 1
            if step == solo_steps and solo_steps:
                _copy_first_layer(model, 1)  # layer 0 alone has trained so far; MiMo starts the rest from it
                log(f"step {step}: layer 0 copied into layers 1..{k - 1} (MiMo init)")
            if chain:
                loss, per_depth, moe = chain_loss(model, batch, 1 if step < solo_steps else k, cfg.objective,
                                                  cfg.labels)
                metrics = {f"acc_{i + 1}": m["accuracy"] for i, m in enumerate(per_depth) if m["count"]}
                metrics.update(moe)
            else:
                loss, metrics = diffusion_loss(model, mask_embedding, batch, cfg.block_length, cfg.labels,
                                               cfg.alpha_schedule, cfg.time_epsilon, cfg.loss_weight, g)
            if not torch.isfinite(loss):
                skipped += 1
                if skipped > 10:
                    raise WarmupError(f"{skipped} non-finite losses (last at step {step}); lower --lr")
                continue
            loss.backward()
            norms = clip_gradients({"mtp": params}, functools.partial(clip_norm, max_norm=cfg.clip_grad))
            skipped += not apply_update(opt, schedule, norms)
            step += 1
            last = {"loss": float(loss.detach()), **metrics}
            if checkpoint is not None and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
                _save(checkpoint, model, mask_embedding, g, opt, schedule, cfg,
                      {"step": step, "skipped": skipped, "batches": consumed})
            if step % cfg.log_every == 0 or step == total:
                shown = " ".join(f"{key} {v:.4f}" for key, v in last.items() if isinstance(v, float))
                log(f"step {step}/{total} lr {schedule.get_last_lr()[0]:.2e} {shown}")
            if step >= total:
                break
    return {"steps": step, "solo_first_layer_steps": solo_steps, "nonfinite_skipped": skipped, "final": last}


def _save(folder: Path, model, mask_embedding, g: torch.Generator, opt, schedule, cfg: WarmupConfig,
          progress: dict) -> None:
    tensors = {"mtp_layers": module_tensors(model.model.mtp_layers), "masking": {"generator": g.get_state()}}
    if mask_embedding is not None:
        tensors["masking"]["mask_embedding"] = mask_embedding.detach()
    state = {**progress, "trunk": trunk_fingerprint(model), "config": dataclasses.asdict(cfg)}
    core.save_checkpoint(folder, tensors, opt, schedule, state)


def _restore(folder: Path, model, mask_embedding, g: torch.Generator, opt, schedule, cfg: WarmupConfig,
             log) -> dict | None:
    """The progress of the checkpoint in `folder` (None: there is none), its MTP layers, mask embedding,
    masking RNG, AdamW and schedule restored; one that another trunk or other settings wrote is refused."""
    found = core.find_checkpoint(folder)
    if found is None:
        return None
    state, now = core.read_state(found), dataclasses.asdict(cfg)
    if state["trunk"] != trunk_fingerprint(model):
        raise WarmupError(f"{found} was trained on another trunk: use another run folder")
    for key in now.keys() - {"log_every", "save_every"}:
        if state["config"].get(key) != now[key]:
            raise WarmupError(f"{found} was written with {key}={state['config'].get(key)!r} (--"
                              f"{key.replace('_', '-')}), this run has {now[key]!r}: use the same settings or "
                              f"another run folder")
    load_module_tensors(model.model.mtp_layers, core.read_tensors(found, "mtp_layers"), found)
    masking = core.read_tensors(found, "masking")
    g.set_state(masking["generator"])
    if mask_embedding is not None:
        with torch.no_grad():
            mask_embedding.copy_(masking["mask_embedding"])
    progress = core.load_checkpoint(found, opt, schedule)
    log(f"resuming the warm start from {found} at step {progress['step']}")
    return progress


@contextlib.contextmanager
def _only_trainable(model, params):
    """Train mode with only `params` requiring grad; the caller's flags come back afterwards."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()


def _endless(source, cfg: WarmupConfig, device):
    """Training batches on `device`, epoch after epoch, reshuffled each epoch."""
    for epoch in itertools.count():
        for batch in source.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            yield {key: v.to(device) for key, v in batch.items()}


# ---- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, source, cfg: WarmupConfig, mask_embedding=None) -> list[dict]:
    """Per predicted position: accuracy % and loss, mean and std (population) across eval batches."""
    model.eval()
    device = model.lm_head.weight.device
    per_batch = []
    for b, batch in enumerate(source.batches("eval", cfg.batch_size, shuffle=False, seed=0)):
        if b >= cfg.eval_batches:
            break
        batch = {key: v.to(device) for key, v in batch.items()}
        if cfg.objective == "diffusion":
            per_batch.append(diffusion_eval(model, mask_embedding, batch, cfg.block_length, cfg.labels))
        else:
            per_batch.append(chain_loss(model, batch, model.num_mtp_layers, cfg.objective, cfg.labels)[1])
    rows = []
    for j in range(len(per_batch[0]) if per_batch else 0):
        seen = [m[j] for m in per_batch if m[j]["count"]]
        acc = torch.tensor([100 * m["accuracy"] for m in seen], dtype=torch.float64)
        loss = torch.tensor([m["loss"] for m in seen], dtype=torch.float64)
        ahead = j + 1 if cfg.objective == "diffusion" else j + 2
        rows.append({"position": j + 1, "predicts": f"t+{ahead}", "batches": len(seen),
                     "accuracy": _stat(acc.mean()), "accuracy_std": _stat(acc.std(unbiased=False)),
                     "loss": _stat(loss.mean()), "loss_std": _stat(loss.std(unbiased=False))})
    return rows


def _stat(x: torch.Tensor) -> float | None:
    return None if math.isnan(float(x)) else round(float(x), 6)


def held_out_prompts(docs: Sequence[Document], limit: int) -> list[list[int]]:
    """A chat document's prompt, or the first quarter (at most 32 tokens) of a plain one."""
    prompts = []
    for d in docs[:limit]:
        cut = d.target_start if 0 < d.target_start < len(d.ids) else max(1, min(32, len(d.ids) // 4))
        prompts.append(d.ids[:cut])
    return prompts


def measure_accept_length(model, prompts: Sequence[list[int]], cfg: WarmupConfig, eos_ids: Sequence[int]) -> dict:
    """Accept length (tokens per target pass) of speculative decoding with all K layers drafting."""
    from verl_mtp.rollout import SamplingParams
    from verl_mtp.trainer.evaluate import held_out_engine

    k = model.num_mtp_layers
    if not prompts:
        return {"accept_length": None, "accept_rate": [], "prompts": 0}
    limit = model.config.max_position_embeddings
    new_tokens = max(1, min(cfg.accept_max_new_tokens, limit - k - 1 - max(map(len, prompts))))
    engine = held_out_engine(model, None, prompts, new_tokens, batch_size=16)
    params = SamplingParams(temperature=cfg.eval_temperature, max_new_tokens=new_tokens,
                            stop_token_ids=list(eos_ids), seed=cfg.seed)
    out = engine.generate([list(p) for p in prompts], params, speculative=k)
    return {"accept_length": round(out.stats.accept_length, 4),
            "accept_rate": [round(out.stats.accept_rate(d), 4) for d in range(1, k + 1)],
            "prompts": len(prompts), "generated_tokens": out.num_tokens, "draft_depth": k,
            "temperature": cfg.eval_temperature}


# ---- report ----------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """Seed 002's per-position table: accuracy % and loss, each with its std across eval batches."""
    lines = ["| position | predicts | accuracy (%) | accuracy std | loss | loss std |",
             "|---------:|:--------:|-------------:|-------------:|-----:|---------:|"]
    lines += [f"| {r['position']} | {r['predicts']} | {_fmt(r['accuracy'], '.2f')} | "
              f"±{_fmt(r['accuracy_std'], '.2f')} | {_fmt(r['loss'], '.4f')} | ±{_fmt(r['loss_std'], '.4f')} |"
              for r in rows]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    b, a = report["before"]["accept"], report["after"]["accept"]
    rates = ", ".join(f"depth {d + 1}: {r:.1%}" for d, r in enumerate(a["accept_rate"]))
    what = "block position (one-step, all masked)" if report["objective"] == "diffusion" else "MTP depth"
    return "\n".join([
        f"## MTP warm start ({report['objective']}, K={report['num_mtp_layers']}, {report['train']['steps']} steps, "
        f"{report['train']['seconds']} s)", "",
        f"Held-out windows: {report['eval_samples']}; rows are per {what}, std across eval batches.", "",
        format_table(report["after"]["positions"]), "",
        f"Accept length (rollout engine, draft depth {a.get('draft_depth', 0)}, temperature "
        f"{a.get('temperature', 0)}, {a['prompts']} held-out prompts): before {_fmt(b['accept_length'], '.3f')} "
        f"-> after {_fmt(a['accept_length'], '.3f')}" + (f"; accept rate {rates}" if rates else ""), "",
        "Before warm start:", "", format_table(report["before"]["positions"])])


def write_report(report: dict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in report.items() if k != "mask_embedding"}
    (run_dir / f"{REPORT_NAME}.json").write_text(json.dumps(plain, indent=2))
    (run_dir / f"{REPORT_NAME}.md").write_text(format_report(report) + "\n")


def save_warm_model(model, report: dict, folder: Path, tokenizer_dir: Path | None = None) -> None:
    """HF/MiMo folder loadable by MTPCausalLM.from_pretrained; tokenizer files copied along; the
    diffusion objective's mask embedding goes to a side file the loader ignores."""
    from safetensors.torch import save_file

    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, folder)
        if (Path(tokenizer_dir) / "generation_config.json").is_file():  # a base model's decoding defaults
            shutil.copyfile(Path(tokenizer_dir) / "generation_config.json", folder / "generation_config.json")
    if "mask_embedding" in report:
        save_file({"mask_embedding": report["mask_embedding"].contiguous()}, str(folder / "mtp_diffusion.safetensors"),
                  metadata={"block_length": str(report["config"]["block_length"])})


# ---- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from verl_mtp.cli import OneLineParser

    ap = OneLineParser(prog="verl-mtp mtp-warmup", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="base model folder (ours, MiMo, Qwen2 or Llama HF)")
    ap.add_argument("--data", required=True, help="corpus file, or a finished collection folder (manifest.json)")
    ap.add_argument("--out", required=True, help="run folder: model/, data/, report")
    ap.add_argument("--format", default="auto", choices=FORMATS, help="corpus format (auto: by extension and rows)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    ap.add_argument("--num-mtp-layers", type=int, default=None, help="K (default: the folder's, at least 1)")
    ap.add_argument("--data-dir", default=None, help="shard folder (default: OUT/data)")
    ap.add_argument("--max-docs", type=int, default=None, help="read at most this many documents / prompts")
    ap.add_argument("--prompt-key", default="prompt", help="chat prompt column")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    for f in dataclasses.fields(WarmupConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "collect":
            mode = ap.add_mutually_exclusive_group()
            mode.add_argument("--collect", dest="collect", action="store_true", default=True, help=f.metadata["help"])
            mode.add_argument("--on-the-fly", dest="collect", action="store_false", help="no shards: run the "
                              "frozen trunk for every batch")
            continue
        kind = f.metadata["kind"] or type(f.default)
        ap.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=f.metadata["choices"],
                        help=f.metadata["help"])
    return ap


def _load_tokenizer(folder: str | None):
    if folder is None or not any((Path(folder) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json and warns that it does not know "mimo"
    try:
        return AutoTokenizer.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)


def _corpus(args, model, tokenizer, cfg: WarmupConfig, out: Path, log):
    """Documents (or a collection) for the chosen format; `self` answers are kept in OUT/self_corpus.jsonl
    so that a rerun (a resumed collection) sees the same corpus."""
    data = Path(args.data)
    if data.is_dir():
        if read_manifest(data) is None:
            raise WarmupError(f"{data}: a folder without {'manifest.json'} (expected a corpus file or a collection)")
        return ShardSource(data, cfg.eval_every)
    if not data.is_file():
        raise WarmupError(f"{data}: no such file")
    fmt = detect_format(str(data)) if args.format == "auto" else args.format
    log(f"corpus: {data} ({fmt})")
    if fmt != "self":
        return read_corpus(str(data), fmt, tokenizer, args.max_docs, args.prompt_key)
    cached = out / "self_corpus.jsonl"
    if cached.is_file():
        log(f"corpus: reusing the model's answers in {cached}")
        return read_corpus(str(cached), "jsonl", None)
    prompts = read_prompts(str(data), tokenizer, args.prompt_key, args.max_docs)
    log(f"corpus: the model answers {len(prompts)} prompts (temperature {cfg.self_temperature})")
    docs = self_generate(model, prompts, _eos_ids(tokenizer, model), cfg.self_temperature, cfg.self_max_new_tokens,
                         cfg.seed)
    write_documents(cached, docs)
    return docs


def run_cli(args, log=print) -> dict:
    from verl_mtp.models import MTPCausalLM, read_config

    cfg = WarmupConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WarmupConfig)})
    if not Path(args.model).is_dir():
        raise WarmupError(f"--model {args.model}: no such folder")
    if not Path(args.data).exists():
        raise WarmupError(f"--data {args.data}: no such file or folder")
    folder_k = read_config(args.model).num_nextn_predict_layers
    k = args.num_mtp_layers if args.num_mtp_layers is not None else max(folder_k, 1)
    if k < 1:
        raise WarmupError(f"--num-mtp-layers={k}: must be >= 1")
    if args.max_docs is not None and args.max_docs < 2:
        raise WarmupError(f"--max-docs={args.max_docs}: must be >= 2")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    model = MTPCausalLM.from_pretrained(args.model, num_mtp_layers=k, dtype=getattr(torch, args.dtype), device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(args, model, tokenizer, cfg, out, log)
    model, report = warm_start(model, tokenizer, corpus, cfg, run_dir=out, data_dir=args.data_dir,
                               trained_mtp_layers=min(folder_k, k), log=log)
    save_warm_model(model, report, out / "model", Path(args.tokenizer or args.model))
    log(f"model: {out / 'model'}   report: {out / (REPORT_NAME + '.md')}")
    return report


def main(argv: list[str] | None = None) -> int:
    from verl_mtp.models import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        run_cli(args)
    except (WarmupError, CheckpointError) as e:
        raise SystemExit(f"verl-mtp mtp-warmup: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
