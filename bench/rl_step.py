"""Wall time of one RL (GRPO) step: verl_mtp vs TRL's GRPOTrainer, same model, prompts and lengths.

    pip install -e '.[bench]'
    python bench/rl_step.py [--steps 6] [--prompts 8] [--n 8] [--max-new 64] [--threads 2] [--dtypes float32,bfloat16]
                            [--out bench/results/rl_step.json]

Both sides start from the same tiny model folder (written by this script: random init, our MiMo
layout which transformers' Qwen2ForCausalLM loads), the same synthetic-math prompts, group size n,
completion length cap, temperature 1, no KL, one optimizer step per generation batch. The first step
of each side is warm-up and not counted; the table reports the median of the rest, and for
verl_mtp the share of step time per phase. It then times the step's fp32 arithmetic alone (decode
matrix multiplies and KV reads for the mean response length, one forward + backward of the batch;
bench/floors.py): TRL's step over that floor bounds what any trainer could gain over TRL here.
--dtypes runs every side once per dtype: for bfloat16 ours sets rollout.dtype and the actor's and
reference's fsdp_config.dtype (verl's keys), TRL its `bf16` flag; the floor stays fp32 (the reference).
Prints the issue's targets (RL step >= 2x TRL; generation phase <= 2x its floor) with PASS/MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_assets(work: Path, hidden: int, layers: int, mtp_layers: int) -> tuple[Path, Path]:
    from verl_mtp.data.synthetic_math import iter_corpus_text, write_rl_dataset
    from verl_mtp.data.tokenizer import train_tokenizer
    from verl_mtp.models import MTPCausalLM, ModelConfig
    from transformers import AutoTokenizer

    paths = write_rl_dataset(str(work / "data"), n_train=512, n_test=16, seed=0)
    model_dir = work / "model"
    train_tokenizer(iter_corpus_text(5000, seed=0), str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, num_nextn_predict_layers=mtp_layers,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    MTPCausalLM(cfg).save_pretrained(model_dir)
    return model_dir, Path(paths["train"])


def run_trl(model_dir: Path, train_file: Path, args, dtype: str = "float32") -> dict:
    import pandas as pd
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from verl_mtp.rewards.scorers import math_dapo

    rows = pd.read_parquet(train_file)
    data = Dataset.from_dict({"prompt": [list(p) for p in rows["prompt"]],
                              "ground_truth": [r["ground_truth"] for r in rows["reward_model"]]})

    def reward(prompts, completions, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [math_dapo.compute_score(t, gt)["score"] for t, gt in zip(texts, ground_truth)]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.n,
                        num_generations=args.n, max_completion_length=args.max_new, max_steps=args.steps,
                        learning_rate=1e-5, use_cpu=True, bf16=dtype == "bfloat16", logging_steps=1, report_to=[],
                        save_strategy="no", beta=0.0, temperature=1.0, top_p=1.0, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    steps = [b - a for a, b in zip(stamps[0::2], stamps[1::2])]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": steps, "mean_response_length": statistics.mean(lengths) if lengths else None}


def ours_overrides(model_dir: Path, train_file: Path, args, mtp: bool, run_dir: Path, dtype: str = "float32") -> list[str]:
    """Our config for the step's settings (shared with bench/rl_step_profile.py)."""
    return [
        f"actor_rollout_ref.model.path={model_dir}", f"data.train_files={train_file}", "data.val_files=null",
        f"data.train_batch_size={args.prompts}", f"actor_rollout_ref.rollout.n={args.n}",
        f"data.max_response_length={args.max_new}", "data.max_prompt_length=64",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.prompts * args.n}",
        "actor_rollout_ref.actor.optim.lr=1e-5", "reward_model.reward_manager=naive",
        "reward_model.overlong_buffer.enable=false", "reward_model.num_workers=1",
        f"trainer.total_training_steps={args.steps}", "trainer.val_before_train=false", "trainer.test_freq=-1",
        "trainer.save_freq=-1", "trainer.logger=[jsonl]", f"trainer.log_dir={run_dir}",
        f"trainer.default_local_dir={run_dir / 'ckpt'}", f"actor_rollout_ref.model.mtp.enable={mtp}",
        f"actor_rollout_ref.model.mtp.enable_train={mtp}", f"actor_rollout_ref.model.mtp.enable_rollout={mtp}",
        f"actor_rollout_ref.model.mtp.num_layers={args.mtp_layers}",
        f"actor_rollout_ref.rollout.max_batch_size={args.prompts * args.n}",
        f"actor_rollout_ref.rollout.dtype={dtype}", f"actor_rollout_ref.actor.fsdp_config.dtype={dtype}",
        f"actor_rollout_ref.ref.fsdp_config.dtype={dtype}",
    ]


def run_ours(model_dir: Path, train_file: Path, args, mtp: bool, work: Path, dtype: str = "float32") -> dict:
    import ray

    from verl_mtp.config import load_config
    from verl_mtp.trainer.ray_trainer import DAPOTrainer

    name = f"{'mtp' if mtp else 'plain'}_{dtype}"
    overrides = ours_overrides(model_dir, train_file, args, mtp, work / name, dtype)
    cfg = load_config(overrides)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    trainer = DAPOTrainer(cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.shutdown()
    phases = ("gen", "reward", "old_log_prob", "adv", "update_actor", "update_weights")
    timed = history[1:]
    return {"step_s": [h["timing_s/step"] for h in history],
            "mean_response_length": statistics.mean(h["response_length/mean"] for h in history),
            "accept_length": statistics.mean(h["rollout/accept_length"] for h in history),
            "phase_share": {p: statistics.mean(h.get(f"timing_s/{p}", 0.0) / h["timing_s/step"] for h in timed)
                            for p in phases},
            "gen_s": statistics.median(h.get("timing_s/gen", 0.0) for h in timed),
            "rollout_probs_diff_mean": statistics.mean(h.get("training/rollout_probs_diff_mean", float("nan"))
                                                       for h in timed)}


def step_floor(model_dir: Path, train_file: Path, args, response_length: float) -> dict:
    """The arithmetic of one GRPO step timed alone (see bench/floors.py): `response_length` decode steps
    at batch prompts x n over a cache of the mean context, then one forward + backward over the batch."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from floors import decode_floor_seconds, update_floor_seconds
    from verl_mtp.data.tokenizer import encode_chat
    from verl_mtp.models import MTPCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = pq.read_table(train_file).to_pylist()[: args.prompts]
    prompt = statistics.mean(len(encode_chat(tok, r["prompt"])) for r in rows)
    model = MTPCausalLM.from_pretrained(model_dir, num_mtp_layers=0)
    batch, new = args.prompts * args.n, round(response_length)
    decode = decode_floor_seconds(model, batch, context=round(prompt + new / 2))
    gen = new * sum(decode.values())
    update = update_floor_seconds(model, batch, round(prompt + new))
    return {"prompt_tokens": round(prompt, 1), "response_tokens": new, "gen_s": round(gen, 4),
            "update_s": round(update, 4), "step_s": round(gen + update, 4)}


def step_arguments(ap: argparse.ArgumentParser, steps: int, threads: int) -> None:
    """The step's model and batch settings (shared with bench/rl_step_profile.py)."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mtp-layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=threads,
                    help="torch threads for TRL and for our workers (VERL_MTP_THREADS)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(ap, steps=6, threads=2)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32|bfloat16: each side runs once per dtype")
    ap.add_argument("--out", default="bench/results/rl_step.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["VERL_MTP_THREADS"] = str(args.threads)  # read by the Ray workers, which inherit the driver's env
    import transformers

    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="rl_step_"))
    model_dir, train_file = build_assets(work, args.hidden, args.layers, args.mtp_layers)
    results = {"config": vars(args), "torch": torch.__version__, "cpus": os.cpu_count()}
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        ap.error(f"--dtypes {args.dtypes}: choose from float32, bfloat16")
    for dtype in dtypes:  # each dtype's sides back to back, so load hits them alike
        tag = "" if dtype == "float32" else "_bf16"
        results[f"verl_mtp_plain{tag}"] = run_ours(model_dir, train_file, args, mtp=False, work=work, dtype=dtype)
        results[f"verl_mtp_mtp{tag}"] = run_ours(model_dir, train_file, args, mtp=True, work=work, dtype=dtype)
        if not args.skip_trl:
            results[f"trl{tag}"] = run_trl(model_dir, train_file, args, dtype)
    median = {k: statistics.median(v["step_s"][1:]) for k, v in results.items() if isinstance(v, dict) and "step_s" in v}
    results["median_step_s"] = median
    length = results["trl" if "trl" in results else next(iter(median))]["mean_response_length"]
    results["floor"] = floor = step_floor(model_dir, train_file, args, length)
    print(f"\none GRPO step: {args.prompts} prompts x n={args.n}, <= {args.max_new} new tokens, "
          f"hidden {args.hidden}, {args.layers} layers; median of steps 2..{args.steps}")
    print(f"{'system':<22}{'step s':>10}{'vs TRL':>10}{'resp len':>10}")
    for k, s in median.items():
        trl = "trl_bf16" if k.endswith("_bf16") and "trl_bf16" in median else "trl"
        speedup = f"{median[trl] / s:.2f}x" if trl in median else "-"
        print(f"{k:<22}{s:>10.3f}{speedup:>10}{results[k]['mean_response_length'] or 0:>10.1f}")
    bound = f"; TRL / floor = {median['trl'] / floor['step_s']:.2f}x, the most any trainer could gain" if "trl" in median else ""
    print(f"floor (fp32 arithmetic alone: {floor['response_tokens']} decode steps + one forward/backward): "
          f"gen {floor['gen_s']:.3f} s + update {floor['update_s']:.3f} s = {floor['step_s']:.3f} s{bound}")
    ours = [k for k in median if k.startswith("verl_mtp")]
    for k in ours:
        shares = ", ".join(f"{p} {100 * v:.0f}%" for p, v in results[k]["phase_share"].items())
        print(f"{k} phase shares: {shares}; gen {results[k]['gen_s']:.3f} s; accept length "
              f"{results[k]['accept_length']:.2f}; rollout_probs_diff_mean {results[k]['rollout_probs_diff_mean']:.2g}")
    results["targets"] = targets = []
    for k in ours:
        trl = "trl_bf16" if k.endswith("_bf16") else "trl"
        if trl in median:
            targets.append({"target": f"{k} step >= 2x {trl}", "value": median[trl] / median[k], "need": 2.0})
        targets.append({"target": f"{k} generation phase <= 2x its fp32 floor",
                        "value": results[k]["gen_s"] / floor["gen_s"], "need": 2.0, "at_most": True})
    print("\n| target | measured | need | status |\n|---|---:|---:|---|")
    for t in targets:
        ok = t["value"] <= t["need"] if t.get("at_most") else t["value"] >= t["need"]
        t["status"] = "PASS" if ok else "MISS"
        print(f"| {t['target']} | {t['value']:.2f}x | {'<=' if t.get('at_most') else '>='} {t['need']}x | {t['status']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
