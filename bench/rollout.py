"""Rollout throughput: transformers `generate` against the native engine, plain and with MTP speculation.

    python bench/rollout.py [--quick] [--model PATH] [--out bench/results/rollout.json] [--threads N] [--repeats N]

Without --model it trains a small MTP model (Qwen2 trunk + K MiMo MTP layers) on a toy Markov chain
(verl_mtp.models.toy) and a smaller Qwen2 draft model on the same chain, saves both as HF folders, and
times, at batch 1 / 8 / 64 with the same prompts and the same number of new tokens:
  (a) transformers `Qwen2ForCausalLM.generate` on the saved folder (greedy, left padding; at batch 1
      also assisted generation with the draft model; `use_mtp=True` is tried and reported);
  (b) NativeEngine, speculative=0 (and (b') with bf16 inference weights, rollout.dtype=bfloat16, where
  the CPU runs bf16 natively: its greedy tokens may differ from (b)'s);  (c) NativeEngine at fixed
  depths K and --deep-depth (past K the last MTP layer is reused, one position further per step);
  (d) NativeEngine, speculative="auto" (depths 0..K+4 searched per round).
Decoding is greedy with no stop tokens, so every arm generates exactly max_new_tokens per prompt, and
every arm's tokens are compared with (b)'s (all but (b') must match). Each arm is warmed up once, then
timed `repeats` times, round-robin across arms so background load hits them alike; the median is
reported with the spread.
Torch threads: unless --threads is given, 1 and 2 threads are probed first with our engine's plain
decoding, and the faster count is used for training and for every arm.
--model PATH benchmarks a saved MiMo/Qwen2 folder instead (prompts still come from the toy chain and
assisted generation is skipped: there is no draft model trained for it).
Prints a table, the floor of a decode step (its matrix multiplies and its attention over the KV cache,
timed alone: they bound how far any fp32 decoder can beat (a) here) and the issue's targets with
PASS/MISS, and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import transformers  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from verl_mtp.models import MTPCausalLM, ModelConfig, read_config  # noqa: E402
from verl_mtp.models.toy import fit_markov, markov_batch, markov_transitions  # noqa: E402
from verl_mtp.rollout import NativeEngine, SamplingParams  # noqa: E402
from verl_mtp.device import bf16_native  # noqa: E402

from floors import decode_floor_seconds  # noqa: E402  (bench/, the script's own folder)


@dataclass
class BenchConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 6
    num_mtp_layers: int = 2  # K; arm (c) drafts at depth K and at deep_depth
    deep_depth: int = 6  # arm (c)'s second fixed depth, reusing the last MTP layer past K (0: skip)
    train_steps: int = 100  # fit_markov steps for trunk + MTP layers together
    draft_hidden_size: int = 128  # the Qwen2 assistant for transformers' assisted generation
    draft_layers: int = 1
    draft_train_steps: int = 100
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    max_new_tokens: int = 128
    prompt_len: tuple[int, int] = (8, 24)  # ragged prompts, lengths drawn uniformly in [lo, hi]
    repeats: int = 5
    thread_choices: tuple[int, ...] = (1, 2)
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                           num_attention_heads=4, num_key_value_heads=2,
                           num_nextn_predict_layers=self.num_mtp_layers, max_position_embeddings=512)

    def draft_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.draft_hidden_size,
                           intermediate_size=2 * self.draft_hidden_size, num_hidden_layers=self.draft_layers,
                           num_attention_heads=4, num_key_value_heads=2, num_nextn_predict_layers=0,
                           max_position_embeddings=512)


def quick_config() -> BenchConfig:
    return BenchConfig(hidden_size=128, intermediate_size=352, num_layers=4, train_steps=60, draft_hidden_size=64,
                       draft_train_steps=60, max_new_tokens=48, repeats=3)


# ---- models ----------------------------------------------------------------------------------


@dataclass
class Models:
    policy: MTPCausalLM
    folder: Path  # HF folder of the policy, read by Qwen2ForCausalLM
    transitions: torch.Tensor  # the toy chain prompts are drawn from
    draft_folder: Path | None  # Qwen2 draft for assisted generation, None when there is none
    notes: dict = field(default_factory=dict)


def build_models(cfg: BenchConfig, model_path: str | None, transitions: torch.Tensor, workdir: Path) -> Models:
    if model_path:
        policy = MTPCausalLM.from_pretrained(model_path).eval()
        return Models(policy, Path(model_path), transitions, None,
                      {"model": model_path, "assisted": "skipped: no draft model trained for a given checkpoint"})
    notes = {}
    policy, seconds = _train(cfg.model_config(), cfg.train_steps, cfg.seed, transitions)
    notes["train_seconds"] = round(seconds, 1)
    draft, seconds = _train(cfg.draft_config(), cfg.draft_train_steps, cfg.seed + 1, transitions)
    notes["draft_train_seconds"] = round(seconds, 1)
    notes["params"] = {"policy_trunk": policy.num_parameters(trunk_only=True), "policy_total": policy.num_parameters(),
                       "draft": draft.num_parameters()}
    policy.save_pretrained(workdir / "policy")
    draft.save_pretrained(workdir / "draft")
    return Models(policy, workdir / "policy", transitions, workdir / "draft", notes)


def _train(model_cfg: ModelConfig, steps: int, seed: int, transitions: torch.Tensor):
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, _ = fit_markov(MTPCausalLM(model_cfg), steps=steps, batch_size=32, seq_len=32, seed=seed,
                          transitions=transitions)
    return model, time.perf_counter() - start


def make_prompts(transitions: torch.Tensor, n: int, cfg: BenchConfig) -> list[list[int]]:
    g = torch.Generator().manual_seed(cfg.seed + n)
    lo, hi = cfg.prompt_len
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [markov_batch(transitions, 1, length, g)[0].tolist() for length in lens]


# ---- arms: each maps prompts to (new tokens per prompt, accept length) ------------------------


class NativeArm:
    def __init__(self, model: MTPCausalLM, speculative: int | str, batch: int, max_new_tokens: int, max_prompt: int,
                 dtype: str | None = None):
        deep = speculative if isinstance(speculative, int) and speculative > model.num_mtp_layers else None
        self.engine = NativeEngine(model, max_batch_size=batch, max_seq_len=max_prompt + max_new_tokens,
                                   speculative=speculative, max_draft_depth=deep, dtype=dtype)
        self.params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
        self.depths: dict[int, int] = {}  # decode rounds per draft depth in the latest run (for "auto")

    def __call__(self, prompts):
        out = self.engine.generate(prompts, self.params)
        self.depths = out.depth_histogram
        return [s.token_ids for s in out.samples], out.stats.accept_length


class HFArm:
    """transformers greedy `generate`, left-padded; accept length = new tokens / target forward passes."""

    def __init__(self, model, max_new_tokens: int, assistant=None):
        self.model, self.assistant, self.max_new_tokens = model, assistant, max_new_tokens

    def __call__(self, prompts):
        ids, mask = left_pad(prompts)
        passes = []
        hook = self.model.register_forward_pre_hook(lambda module, args: passes.append(1))
        kwargs = {"assistant_model": self.assistant} if self.assistant is not None else {}
        try:
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0,
                                          max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens,
                                          **kwargs)
        finally:
            hook.remove()
        return out[:, ids.shape[1]:].tolist(), self.max_new_tokens / max(len(passes), 1)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def load_hf(folder: Path):
    return Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def try_use_mtp(hf_model, prompt: list[int]) -> str:
    """transformers >= 5 has `generate(use_mtp=True)` for checkpoints in its own MTP layout; report what happens."""
    try:
        with torch.no_grad():
            hf_model.generate(torch.tensor([prompt]), use_mtp=True, do_sample=False, max_new_tokens=4, pad_token_id=0)
        return "ran"
    except Exception as e:  # the point is to report the library's answer, whatever it is
        return f"unsupported: {type(e).__name__}: {str(e).splitlines()[0]}"


# ---- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: list[float]
    tokens: list[list[int]]
    accept_length: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> float:
        """(max - min) / median over the repeats: how noisy this arm's timing was."""
        return (max(self.seconds) - min(self.seconds)) / self.median


def time_arms(arms: dict, prompts, repeats: int) -> dict[str, Timing]:
    for arm in arms.values():  # warm-up: allocation, first-call paths, the auto controller's first look
        arm(prompts)
    results = {name: Timing([], [], 0.0) for name in arms}
    accepts: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            start = time.perf_counter()
            tokens, accept = arm(prompts)
            results[name].seconds.append(time.perf_counter() - start)
            results[name].tokens = tokens
            accepts[name].append(accept)
    for name in arms:
        results[name].accept_length = statistics.mean(accepts[name])
    return results


class WithThreads:
    """An arm run with a given torch thread count, so thread counts can be interleaved like arms."""

    def __init__(self, threads: int, arm):
        self.threads, self.arm = threads, arm

    def __call__(self, prompts):
        torch.set_num_threads(self.threads)
        return self.arm(prompts)


def probe_threads(model_cfg: ModelConfig, prompts_by_batch: dict[int, list], cfg: BenchConfig) -> tuple[int, dict]:
    """Our engine's plain decoding at the smallest and largest batch with each thread count, timed
    interleaved; the count with the best geometric-mean tokens/s is used for training and every arm.
    Plain decoding does the same work whatever the weights, so an untrained model of the right shape
    serves, and the probe can run before training."""
    model = MTPCausalLM(model_cfg).eval()
    new_tokens = 16  # short: an oversubscribed thread count can be 10-100x slower on a shared machine
    rates: dict[int, dict[str, float]] = {t: {} for t in cfg.thread_choices}
    for b in sorted({min(cfg.batch_sizes), max(cfg.batch_sizes)}):
        arms = {t: WithThreads(t, NativeArm(model, 0, b, new_tokens, cfg.prompt_len[1])) for t in cfg.thread_choices}
        for t, timing in time_arms(arms, prompts_by_batch[b], 3).items():
            rates[t][f"batch {b}"] = round(b * new_tokens / timing.median, 1)
    score = {t: math.exp(statistics.mean(math.log(r) for r in r_t.values())) for t, r_t in rates.items()}
    return max(score, key=score.get), rates


# ---- the benchmark ---------------------------------------------------------------------------

ARM_LABELS = {"hf": "(a) transformers generate", "hf_assisted": "(a') transformers assisted (draft model)",
              "plain": "(b) ours speculative=0", "plain_bf16": "(b') ours speculative=0, bf16 (rollout.dtype)",
              "auto": "(d) ours speculative=auto"}


def spec_arm(depth: int) -> str:
    """Arm (c) at a fixed draft depth."""
    return f"spec_{depth}"


def arm_label(name: str) -> str:
    return f"(c) ours speculative={name.split('_')[1]}" if name.startswith("spec_") else ARM_LABELS[name]


def run(cfg: BenchConfig, model_path: str | None, threads: int | None) -> dict:
    load_before = os.getloadavg()
    model_cfg = read_config(model_path) if model_path else cfg.model_config()
    transitions = markov_transitions(model_cfg.vocab_size, seed=cfg.seed)
    prompts = {b: make_prompts(transitions, b, cfg) for b in cfg.batch_sizes}
    probe = {}
    if threads is None:
        log(f"probing torch threads {cfg.thread_choices}")
        threads, probe = probe_threads(model_cfg, prompts, cfg)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"loading {model_path}" if model_path else "training the MTP model and the draft model")
        models = build_models(cfg, model_path, transitions, Path(tmp))
        hf = load_hf(models.folder)
        draft = load_hf(models.draft_folder) if models.draft_folder else None
    policy, k = models.policy, models.policy.num_mtp_layers
    use_mtp = try_use_mtp(hf, prompts[min(cfg.batch_sizes)][0])
    rows, floors = [], []
    for b in cfg.batch_sizes:
        log(f"batch {b}: {cfg.repeats} timed runs per arm, {threads} thread(s)")
        arms = {"hf": HFArm(hf, cfg.max_new_tokens)}
        if b == 1 and draft is not None:
            arms["hf_assisted"] = HFArm(hf, cfg.max_new_tokens, assistant=draft)
        arms["plain"] = NativeArm(policy, 0, b, cfg.max_new_tokens, cfg.prompt_len[1])
        if bf16_native(policy.lm_head.weight.device):  # (b'): greedy tokens may differ from (b)'s
            arms["plain_bf16"] = NativeArm(policy, 0, b, cfg.max_new_tokens, cfg.prompt_len[1], dtype="bfloat16")
        for depth in fixed_depths(k, cfg.deep_depth):
            arms[spec_arm(depth)] = NativeArm(policy, depth, b, cfg.max_new_tokens, cfg.prompt_len[1])
        if k:
            arms["auto"] = NativeArm(policy, "auto", b, cfg.max_new_tokens, cfg.prompt_len[1])
        timings = time_arms(arms, prompts[b], cfg.repeats)
        rows += table_rows(b, arms, timings, cfg.max_new_tokens)
        hf_step = timings["hf"].median / cfg.max_new_tokens
        floor = decode_floor_seconds(policy, b, context=sum(cfg.prompt_len) // 2 + cfg.max_new_tokens // 2)
        floors.append({"batch": b, "hf_ms_per_step": round(1e3 * hf_step, 3),
                       "plain_ms_per_step": round(1e3 * timings["plain"].median / cfg.max_new_tokens, 3),
                       "gemm_ms_per_step": round(1e3 * floor["gemm"], 3),
                       "attention_ms_per_step": round(1e3 * floor["attention"], 3),
                       "max_plain_vs_hf": round(hf_step / sum(floor.values()), 2)})
    notes = dict(models.notes)
    if draft is not None:
        notes["assisted"] = f"Qwen2 draft, {notes['params']['draft']} params, transformers' default assistant settings"
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "machine": machine(threads),
        "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "config": asdict(cfg),
        "threads": {"used": threads, "probe_tokens_per_s": probe},
        "notes": notes,
        "transformers_use_mtp": use_mtp,
        "rows": rows,
        "decode_floor": floors,
        "targets": check_targets(rows, fixed_depths(k, cfg.deep_depth), floors),
    }


def fixed_depths(k: int, deep_depth: int) -> list[int]:
    return [d for d in dict.fromkeys((k, deep_depth)) if d and k]


def table_rows(batch: int, arms: dict, timings: dict[str, Timing], new_tokens: int) -> list[dict]:
    reference = timings["plain"].tokens
    rate = {name: batch * new_tokens / t.median for name, t in timings.items()}
    rows = []
    for name, t in timings.items():
        if any(len(seq) != new_tokens for seq in t.tokens):
            raise RuntimeError(f"{name} at batch {batch} did not generate exactly {new_tokens} tokens per prompt")
        row = {"batch": batch, "arm": name, "label": arm_label(name), "tokens_per_s": round(rate[name], 1),
               "seconds_median": round(t.median, 4), "seconds": [round(s, 4) for s in t.seconds],
               "spread": round(t.spread(), 3), "accept_length": round(t.accept_length, 3),
               "vs_hf": round(rate[name] / rate["hf"], 3), "vs_plain": round(rate[name] / rate["plain"], 3),
               "same_tokens_as_plain": sum(a == b for a, b in zip(t.tokens, reference)) / len(reference)}
        if isinstance(arms[name], NativeArm):
            row["depth_histogram"] = {str(d): n for d, n in sorted(arms[name].depths.items())}
        rows.append(row)
    return rows


def check_targets(rows: list[dict], depths: list[int], floors: list[dict] = ()) -> list[dict]:
    """The issues' targets; (c) is checked at every fixed depth that ran, (d) whenever auto ran; (b)'s step
    (prefill included) over the floor of a decode step: <= 1.5x at batch 64, <= 2x below."""
    at = {(r["batch"], r["arm"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    out = []

    def target(name, batch, value, need, status=None, at_most=False):
        status = status or ("PASS" if (value <= need if at_most else value >= need) else "MISS")
        out.append({"target": name, "batch": batch, "value": round(value, 3), "need": need, "status": status,
                    "at_most": at_most})

    for f in floors:
        floor = f["gemm_ms_per_step"] + f["attention_ms_per_step"]
        need = 1.5 if f["batch"] >= 64 else 2.0
        target(f"(b) step <= {need}x its floor", f["batch"], f["plain_ms_per_step"] / floor, need, at_most=True)

    for b in (b for b in batches if b >= 8):
        target("(b) >= 3x (a)", b, at[(b, "plain")]["vs_hf"], 3.0)
    for depth in depths if 1 in batches else []:
        spec = at[(1, spec_arm(depth))]
        gated = None if spec["accept_length"] >= 2.5 else f"N/A (accept {spec['accept_length']:.2f} < 2.5)"
        target(f"(c) depth {depth} >= 1.8x (b) if accept >= 2.5", 1, spec["vs_plain"], 1.8, gated)
    for b in batches if depths else []:
        target("(d) >= 0.97x (b)", b, at[(b, "auto")]["vs_plain"], 0.97)
    for b in batches if depths else []:  # depth 0 is a fixed depth too
        best = max(at[(b, arm)]["tokens_per_s"] for arm in ["plain"] + [spec_arm(d) for d in depths])
        target("(d) auto >= 0.95x best fixed depth", b, at[(b, "auto")]["tokens_per_s"] / best, 0.95)
    return out


def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ---- output ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def format_report(result: dict) -> str:
    lines = ["| batch | arm | tokens/s | spread | accept len | vs (a) | vs (b) | = (b) tokens | auto depths |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        depths = ", ".join(f"{d}:{n}" for d, n in r.get("depth_histogram", {}).items()) if r["arm"] == "auto" else ""
        lines.append(f"| {r['batch']} | {r['label']} | {r['tokens_per_s']:.0f} | ±{100 * r['spread'] / 2:.0f}% | "
                     f"{r['accept_length']:.2f} | {r['vs_hf']:.2f}x | {r['vs_plain']:.2f}x | "
                     f"{100 * r['same_tokens_as_plain']:.0f}% | {depths} |")
    lines += ["", "| batch | (a) ms/step | (b) ms/step | floor: GEMMs ms/step | floor: KV attention ms/step | "
                  "(b)/(a) if nothing else cost time |", "|---:|---:|---:|---:|---:|---:|"]
    for f in result["decode_floor"]:
        lines.append(f"| {f['batch']} | {f['hf_ms_per_step']:.2f} | {f['plain_ms_per_step']:.2f} | "
                     f"{f['gemm_ms_per_step']:.2f} | {f['attention_ms_per_step']:.2f} | {f['max_plain_vs_hf']:.2f}x |")
    lines += ["", "| target | batch | measured | need | status |", "|---|---:|---:|---:|---|"]
    for t in result["targets"]:
        need = f"{'<=' if t.get('at_most') else '>='} {t['need']}x"
        lines.append(f"| {t['target']} | {t['batch']} | {t['value']:.3f}x | {need} | {t['status']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer tokens and repeats")
    ap.add_argument("--model", help="a saved MiMo/Qwen2 folder to benchmark instead of training one")
    ap.add_argument("--out", default="bench/results/rollout.json")
    ap.add_argument("--threads", type=int, help="torch threads for every arm (default: probe 1 vs 2)")
    ap.add_argument("--repeats", type=int, help="timed runs per arm (median reported)")
    ap.add_argument("--deep-depth", type=int, help="arm (c)'s second fixed draft depth (default 6; 0 skips it)")
    args = ap.parse_args(argv)
    cfg = quick_config() if args.quick else BenchConfig()
    if args.repeats:
        cfg.repeats = args.repeats
    if args.deep_depth is not None:
        if args.deep_depth < 0:
            ap.error("--deep-depth must be >= 0")
        cfg.deep_depth = args.deep_depth
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    result = run(cfg, args.model, args.threads)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(f"threads: {result['threads']}; load average {result['load_average_1min']}")
    print(f"notes: {result['notes']}")
    print(f"transformers generate(use_mtp=True): {result['transformers_use_mtp']}")
    print(format_report(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['total_seconds']} s)")


if __name__ == "__main__":
    main()
