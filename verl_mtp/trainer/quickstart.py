"""The CPU quickstart: the whole product on a laptop, nothing downloaded but packages.

    verl-mtp quickstart [--out runs/quickstart] [--rl-steps 40] [--no-control] [--fresh] [RL overrides ...]

Trailing `key=value` arguments are Hydra overrides for both RL runs, applied after the quickstart's
own (e.g. `actor_rollout_ref.actor.optim.lr=1e-4` to try another learning rate).

Stages (each resumable: re-running the command skips finished stages and resumes the running one):
  1. data       synthetic multi-step arithmetic task (verl parquet, train/test) + SFT corpus
  2. tokenizer  a small BPE tokenizer with a chat template
  3. sft        a tiny model with K=2 MTP layers, trained on solution traces (main + MTP loss);
                when the SFT model has no trained MTP heads, `mtp-warmup` trains them on its frozen trunk
  4. rl         DAPO with MTP trained jointly and used for speculative rollout (local Ray)
  5. rl_control the same RL stage with `mtp.enable_train=false`: how acceptance drifts without it
  6. eval       held-out accuracy (greedy, sampled), accept length per depth, rollout tokens/s with
                and without speculation; summary printed and written with plots to OUT/report/
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

QUICKSTART_RL = [
    "data.train_batch_size=16", "data.max_prompt_length=64", "data.max_response_length=64",
    "actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.temperature=1.0",
    "actor_rollout_ref.rollout.max_batch_size=128",
    "actor_rollout_ref.actor.ppo_mini_batch_size=16", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64",
    "actor_rollout_ref.actor.optim.lr=5e-5", "actor_rollout_ref.actor.optim.clip_grad=1.0",
    "actor_rollout_ref.actor.optim.weight_decay=0.0",
    "actor_rollout_ref.model.mtp.enable=true", "actor_rollout_ref.model.mtp.num_layers=2",
    "actor_rollout_ref.model.mtp.enable_rollout=true", "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.3",
    "actor_rollout_ref.model.mtp.detach_encoder=true",
    # a fixed depth keeps accept length comparable across steps (the headline curve) and the run replayable
    "actor_rollout_ref.model.mtp.speculative_num_steps=2",
    "reward_model.reward_manager=dapo", "reward_model.overlong_buffer.enable=true", "reward_model.overlong_buffer.len=16",
    "algorithm.adv_estimator=grpo", "algorithm.filter_groups.enable=true", "algorithm.filter_groups.metric=acc",
    "algorithm.filter_groups.max_num_gen_batches=12", "data.gen_batch_size=24",
    "trainer.logger=[console,jsonl,tensorboard]", "trainer.val_before_train=true", "trainer.test_freq=10",
    "trainer.save_freq=10", "actor_rollout_ref.rollout.val_kwargs.n=1", "actor_rollout_ref.rollout.val_kwargs.do_sample=false",
]


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def stage_data(run: Path, seed: int) -> Path:
    from verl_mtp.data.synthetic_math import write_rl_dataset

    data = run / "data"
    if not (data / "DONE").exists():
        _say("stage 1/6 data: writing the synthetic math task")
        write_rl_dataset(str(data), n_train=8192, n_test=512, seed=seed, n_sft=20000)
        (data / "DONE").write_text("ok")
    return data


def stage_tokenizer(run: Path, data: Path) -> Path:
    from verl_mtp.data.synthetic_math import iter_corpus_text
    from verl_mtp.data.tokenizer import train_tokenizer

    tok = run / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        _say("stage 2/6 tokenizer: training a BPE tokenizer on the corpus")
        train_tokenizer(iter_corpus_text(20000, seed=0), str(tok))
    return tok


def stage_sft(run: Path, data: Path, tok: Path, seed: int, steps: int | None) -> Path:
    from verl_mtp.trainer.sft import SFTConfig, train_sft

    out = run / "sft"
    if not (out / "DONE").exists():
        _say("stage 3/6 sft: training a tiny MTP model on the solution traces")
        cfg = SFTConfig(data=str(data / "sft.jsonl"), out=str(out), tokenizer=str(tok), seed=seed, test_data=None)
        if steps:
            cfg.steps = steps
        metrics = train_sft(cfg)
        if metrics.get("interrupted"):
            raise KeyboardInterrupt
        (out / "DONE").write_text(json.dumps(metrics))
    return out


def stage_warmup(run: Path, sft: Path, data: Path, tok_dir: Path, k: int = 2) -> Path:
    """The SFT model's MTP heads are the draft; when it has fewer trained layers than K (e.g. an SFT run
    with --mtp-layers 0, or a base model), warm-start them on the frozen trunk first."""
    from verl_mtp.models import MTPCausalLM, read_config
    from verl_mtp.trainer.mtp_warmup import WarmupConfig, save_warm_model, warm_start
    from verl_mtp.trainer.setup import load_tokenizer

    trained = read_config(sft).num_nextn_predict_layers
    if trained >= k:
        return sft
    out = run / "mtp_warmup"
    if not (out / "model" / "model.safetensors").exists():
        _say(f"stage 3b/6 mtp-warmup: the SFT model has {trained} MTP layers; warm-starting {k} on its trunk")
        import pyarrow.parquet as pq

        rows = pq.read_table(data / "train.parquet").to_pylist()[:256]
        texts = [r["extra_info"]["solution"] for r in rows]
        model, report = warm_start(MTPCausalLM.from_pretrained(sft, num_mtp_layers=k), load_tokenizer(str(tok_dir)),
                                   texts, WarmupConfig(sample_size=128, stride=64, steps=200, lr=1e-3),
                                   run_dir=out, trained_mtp_layers=trained, log=_say)
        save_warm_model(model, report, out / "model", tokenizer_dir=sft)
    return out / "model"


def stage_rl(run: Path, name: str, sft: Path, data: Path, steps: int, train_mtp: bool, seed: int,
             extra: list[str] = ()) -> Path:
    import ray

    from verl_mtp.config import load_config
    from verl_mtp.trainer.ray_trainer import DAPOTrainer

    folder = run / name
    final = folder / "ckpt" / f"global_step_{steps}" / "actor"
    if (final / "model.safetensors").exists():
        return final
    _say(f"stage {'4' if train_mtp else '5'}/6 {name}: DAPO with MTP heads "
         f"{'trained jointly' if train_mtp else 'frozen (control)'} for {steps} steps")
    overrides = QUICKSTART_RL + [
        f"actor_rollout_ref.model.path={sft}", f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}", f"trainer.total_training_steps={steps}",
        f"trainer.log_dir={folder}", f"trainer.default_local_dir={folder / 'ckpt'}", f"trainer.seed={seed}",
        f"trainer.experiment_name=quickstart_{name}", f"actor_rollout_ref.model.mtp.enable_train={train_mtp}",
        *extra,
    ]
    cfg = load_config(overrides)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    previous = os.environ.get("TENSORBOARD_DIR")
    os.environ["TENSORBOARD_DIR"] = str(folder / "tensorboard")  # the event files stay in the run folder
    try:
        trainer = DAPOTrainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.shutdown()
    finally:
        if previous is None:
            os.environ.pop("TENSORBOARD_DIR")
        else:
            os.environ["TENSORBOARD_DIR"] = previous
    return final


def evaluate(model_dir: Path, tok, test_parquet: Path, limit: int = 512) -> dict[str, float]:
    """Held-out accuracy (greedy; sampled at T=1 over 4 samples), accept length per depth at the
    rollout's settings, and generation speed with and without speculation (batch 64)."""
    import pyarrow.parquet as pq

    from verl_mtp.data.tokenizer import encode_chat
    from verl_mtp.models import MTPCausalLM
    from verl_mtp.rewards.scorers.math_dapo import compute_score
    from verl_mtp.rollout import NativeEngine, SamplingParams

    model = MTPCausalLM.from_pretrained(model_dir)
    rows = pq.read_table(test_parquet).to_pylist()[:limit]
    prompts = [encode_chat(tok, r["prompt"]) for r in rows]
    truth = [str(r["reward_model"]["ground_truth"]) for r in rows]
    engine = NativeEngine(model, tok, max_batch_size=64, max_seq_len=max(map(len, prompts)) + 64)
    stop = [tok.eos_token_id]

    def accuracy(out, n):
        texts = [tok.decode(s.token_ids, skip_special_tokens=True) for s in out.samples]
        return sum(compute_score(t, truth[i // n])["acc"] for i, t in enumerate(texts)) / len(texts)

    result = {}
    greedy = SamplingParams(temperature=0, max_new_tokens=64, stop_token_ids=stop)
    plain = engine.generate(prompts, greedy, speculative=0)
    result["acc/greedy"] = accuracy(plain, 1)
    result["tokens_per_s/plain"] = plain.tokens_per_s
    spec = engine.generate(prompts, greedy, speculative=2)
    result["tokens_per_s/speculative_2"] = spec.tokens_per_s
    result["accept_length/greedy"] = spec.stats.accept_length
    auto = engine.generate(prompts, greedy, speculative="auto")
    result["tokens_per_s/auto"] = auto.tokens_per_s
    sampled = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=64, stop_token_ids=stop,
                                                      seed=0), speculative=2)
    result["acc/sampled"] = accuracy(sampled, 4)
    result["accept_length/sampled"] = sampled.stats.accept_length
    for k in range(1, 3):
        result[f"accept_rate_{k}/sampled"] = sampled.stats.accept_rate(k)
    return result


def stage_eval(run: Path, tok_dir: Path, data: Path, models: dict[str, Path], started: float,
               limit: int = 512) -> dict:
    from verl_mtp.observability.report import plot_runs, read_metrics, write_report
    from verl_mtp.trainer.setup import load_tokenizer

    _say("stage 6/6 eval: held-out accuracy, acceptance, speed")
    tok = load_tokenizer(str(tok_dir))
    results = {name: evaluate(path, tok, data / "test.parquet", limit) for name, path in models.items()}
    report = run / "report"
    report.mkdir(exist_ok=True)
    runs = {name: read_metrics(run / name)[0] for name in ("rl", "rl_control") if (run / name / "metrics.jsonl").exists()}
    plots = {}
    for key in ("rollout/accept_length", "critic/acc/mean", "critic/score/mean", "response_length/mean"):
        path = report / f"{key.replace('/', '_')}.png"
        plot_runs(runs, key, str(path))
        plots[key] = path.name
    for name in runs:
        write_report(str(run / name), str(report / name))
    summary = {"models": results, "plots": plots, "minutes": (time.time() - started) / 60}
    (report / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = _summary_lines(results, runs, summary["minutes"])
    (report / "summary.md").write_text("\n".join(["# Quickstart summary", "", *lines, ""] +
                                                 [f"![{k}]({v})" for k, v in plots.items()]))
    print("\n".join(lines), flush=True)
    return summary


def _summary_lines(results: dict, runs: dict, minutes: float) -> list[str]:
    cols = ["acc/greedy", "acc/sampled", "accept_length/sampled", "accept_rate_1/sampled", "accept_rate_2/sampled",
            "tokens_per_s/plain", "tokens_per_s/speculative_2", "tokens_per_s/auto"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if r[c] < 10 else f"{r[c]:.0f}" for c in cols) + " |")
    for name, rows in runs.items():
        accept = [r["rollout/accept_length"] for r in rows if "rollout/accept_length" in r]
        if accept:
            lines.append(f"- {name}: rollout accept length first {accept[0]:.3f}, last {accept[-1]:.3f}, "
                         f"min {min(accept):.3f} over {len(accept)} steps")
    lines.append(f"- wall time: {minutes:.1f} min")
    return lines


def main(argv: list[str] | None = None) -> int:
    from verl_mtp.cli import OneLineParser

    ap = OneLineParser(prog="verl-mtp quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart", help="run folder")
    ap.add_argument("--rl-steps", type=int, default=40, help="DAPO steps per RL run")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: the SFT stage's)")
    ap.add_argument("--no-control", action="store_true", help="skip the enable_train=false control run")
    ap.add_argument("--fresh", action="store_true", help="delete the run folder first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=512, help="held-out prompts evaluated per model")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for both RL runs")
    args = ap.parse_args(argv)
    if args.rl_steps < 1:
        ap.error("--rl-steps must be >= 1")
    if args.eval_limit < 1:
        ap.error("--eval-limit must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"RL override {bad[0]!r} is not KEY=VALUE")
    if args.overrides:  # a bad key fails here, in one line, not after the SFT stage
        from verl_mtp.config import ConfigError, load_config

        try:
            load_config(QUICKSTART_RL + args.overrides)
        except ConfigError as e:
            ap.error(str(e))
    import torch

    # a tiny model gains little from more threads, and OpenMP threads collapse when the cores are shared
    torch.set_num_threads(1)
    run = Path(args.out)
    if args.fresh:
        shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        data = stage_data(run, args.seed)
        tok = stage_tokenizer(run, data)
        sft = stage_warmup(run, stage_sft(run, data, tok, args.seed, args.sft_steps), data, tok)
        models = {"sft": sft, "rl": stage_rl(run, "rl", sft, data, args.rl_steps, True, args.seed, args.overrides)}
        if not args.no_control:
            models["rl_control"] = stage_rl(run, "rl_control", sft, data, args.rl_steps, False, args.seed,
                                            args.overrides)
        stage_eval(run, tok, data, models, started, args.eval_limit)
    except KeyboardInterrupt:
        _say(f"interrupted; run the same command again to resume from {run}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
