"""The CPU quickstart: the whole product on a laptop, nothing downloaded but packages.

    verl-mtp quickstart [--out runs/quickstart] [--rl-steps 40] [--teacher-slip 0.5] [--no-control] [--fresh]
                        [--scenario default|shift] [--arms frozen,ce,soft_ce,tv] [RL overrides ...]

Trailing `key=value` arguments are Hydra overrides for both RL runs, applied after the quickstart's
own (e.g. `actor_rollout_ref.actor.optim.lr=1e-4` to try another learning rate). Every stage is also a
command of its own; recipes/quickstart_cpu.sh chains those.

Stages (each resumable: re-running the command skips finished stages and resumes the running one):
  1. data       synthetic multi-step arithmetic task (verl parquet, train/test) + SFT corpus, written
                by a fallible teacher who drops half of the carries and borrows (`--teacher-slip`)
  2. tokenizer  a small BPE tokenizer with a chat template
  3. sft        a tiny model with K=2 MTP layers, trained on solution traces (main + MTP loss);
                when the SFT model has no trained MTP heads, `mtp-warmup` trains them on its frozen trunk
  4. rl         DAPO with MTP trained jointly and used for speculative rollout (local Ray; config
                verl_mtp/config/quickstart_rl.yaml, `verl-mtp dapo --config-name=quickstart_rl`)
  5. rl_control the same RL stage with `mtp.enable_train=false`: how acceptance drifts without it
  6. eval       held-out accuracy (greedy, sampled), accept length per depth, rollout tokens/s with
                and without speculation; summary printed and written with plots to OUT/report/
                (`verl-mtp eval`)

`--scenario shift` (default folder runs/shift) is the experiment in which RL moves the policy away from its
draft: the SFT teacher puts 0, 1 or 2 spaces in every gap of a trace line (`17 + 5 = 22`, `17+5=22`, ...),
so the SFT model and its MTP heads write all those layouts, and stages 4-5 become one RL run per MTP arm
(`--arms`, default all four) from that SFT model under a format reward (SCENARIOS below) that selects
one layout, `17 + 5 = 22` (each space is a token of its own there), at 4x the learning rate (2e-4) so that
40 steps move it as a longer run would, and the MTP layers at 4x that (`mtp.lr_scale=4`).
Arms: `frozen` (MTP not trained, the control) and one per `actor_rollout_ref.model.mtp.loss_type` (ce,
soft_ce, tv). The eval then also writes OUT/report/shift.md (per arm: the accept length kept from the
post-SFT model, the expected acceptance per depth and the response length over the RL steps, held-out
accuracy, rollout tokens/s at batch 8, and the issue's targets as PASS / MISS rows) and
OUT/report/shift_*.png. Each arm is its own resumable stage. What it shows is in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

DATA_SIZES = {"n_train": 8192, "n_test": 512, "n_sft": 20000}  # RL prompts, held-out problems, SFT traces
RL_CONFIG = "quickstart_rl"  # verl_mtp/config/quickstart_rl.yaml: dapo_trainer plus the quickstart's settings
# What each scenario changes: the SFT teacher's trace layout (synthetic_math TRACE_FORMS), the tokenizer, and
# the RL overrides. "default": one layout and the task's reward alone, which moves this policy too little for a
# frozen draft to fall behind (2.880 vs 2.896 accept length after 40 steps, docs/benchmarks.md). "shift": the
# teacher puts 0, 1 or 2 spaces in every gap of a trace line, so the SFT model (and its draft) writes
# `17 + 5 = 22`, `17+5=22`, `17  +5 = 22` alike, every space a token of its own; the reward is the task's minus
# 3x the share of trace gaps that do not hold exactly one space (rewards.scorers.tidy_compute_score, a format
# reward for the house style `17 + 5 = 22`); groups are filtered on the final reward (seq_final_reward), so
# all-correct and all-wrong groups teach the layout too; 4x the learning rate, so that 40 steps move the
# weights as a longer run would; the MTP layers at 4x that lr (`mtp.lr_scale`: at the policy's own lr a
# trained draft kept 0.93 of its accept length, at 4x 0.98) and the MTP loss at scale 1.0. Other designs
# tried (docs/benchmarks.md): DAPO's overlong buffer over the whole response moved the layout but rewarded
# short wrong answers; 0.01 per character of a correct answer was too weak; a penalty on the share of spaces
# moved the policy to a layout whose arithmetic the SFT model had barely seen, and accuracy fell with it;
# two optimizer steps per RL step moved the layout faster but held-out accuracy fell to 0.26.
SCENARIOS = {
    "default": {"out": "runs/quickstart", "trace_forms": "fixed", "isolate_spaces": False, "overrides": []},
    "shift": {"out": "runs/shift", "trace_forms": "mixed", "isolate_spaces": True, "overrides": [
        "actor_rollout_ref.actor.optim.lr=2e-4", "custom_reward_function.path=pkg://verl_mtp.rewards.scorers",
        "custom_reward_function.name=tidy_compute_score", "+custom_reward_function.reward_kwargs.weight=3.0",
        "algorithm.filter_groups.metric=seq_final_reward",
        "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=1.0", "actor_rollout_ref.model.mtp.lr_scale=4"]},
}
ARMS = ("frozen", "ce", "soft_ce", "tv")  # MTP frozen, or trained with this model.mtp.loss_type


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


class QuickstartError(Exception):
    """A run folder that cannot be continued as asked."""


def _finished(done: Path, options: dict, unrecorded: dict | None = None) -> bool:
    """Whether the stage that writes `done` finished, with these options. Finished with other options is an
    error: reusing it would silently mix runs. `unrecorded`: what folders from before an option was
    recorded in DONE were made with (default: the options asked for)."""
    if not done.exists():
        return False
    try:
        recorded = json.loads(done.read_text())
    except json.JSONDecodeError:
        recorded = {}
    before = {k: recorded.get(k, (unrecorded or {}).get(k, v)) for k, v in options.items()}
    if before != options:
        raise QuickstartError(f"{done.parent} was made with {before}, not {options}: use --fresh or another --out")
    return True


def stage_data(run: Path, seed: int, teacher_slip: float, trace_forms: str = "fixed") -> Path:
    from verl_mtp.data.synthetic_math import write_rl_dataset

    data, options = run / "data", {"seed": seed, "teacher_slip": teacher_slip, "trace_forms": trace_forms}
    # older folders recorded neither: a perfect teacher's, in one layout
    if _finished(data / "DONE", options, unrecorded={"teacher_slip": 0.0, "trace_forms": "fixed"}):
        return data
    _say(f"stage 1/6 data: writing the synthetic math task (SFT teacher drops carries with p={teacher_slip}, "
         f"{trace_forms} trace layout)")
    write_rl_dataset(str(data), seed=seed, teacher_slip=teacher_slip, trace_forms=trace_forms, **DATA_SIZES)
    (data / "DONE").write_text(json.dumps(options))
    return data


def stage_tokenizer(run: Path, data: Path, isolate_spaces: bool = False) -> Path:
    from verl_mtp.data.synthetic_math import iter_corpus_text
    from verl_mtp.data.tokenizer import train_tokenizer

    tok, options = run / "tokenizer", {"isolate_spaces": isolate_spaces}
    if (tok / "tokenizer.json").exists() and not (tok / "DONE").exists():
        (tok / "DONE").write_text("{}")  # a folder from before the option was recorded
    if _finished(tok / "DONE", options, unrecorded={"isolate_spaces": False}):  # (spaces merged into words)
        return tok
    _say("stage 2/6 tokenizer: training a BPE tokenizer on the corpus" + (" (spaces as tokens)" * isolate_spaces))
    train_tokenizer(iter_corpus_text(20000, seed=0), str(tok), isolate_spaces=isolate_spaces)
    (tok / "DONE").write_text(json.dumps(options))
    return tok


def stage_sft(run: Path, data: Path, tok: Path, seed: int, steps: int | None) -> Path:
    from verl_mtp.trainer.sft import SFTConfig, train_sft

    out = run / "sft"
    cfg = SFTConfig(data=str(data / "sft.jsonl"), out=str(out), tokenizer=str(tok), seed=seed, test_data=None)
    if steps:
        cfg.steps = steps
    if _finished(out / "DONE", {"steps": cfg.steps}):
        return out
    _say("stage 3/6 sft: training a tiny MTP model on the solution traces")
    import torch

    # nothing else runs during SFT: two threads train the tiny model 1.4x faster than one (docs/benchmarks.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        metrics = train_sft(cfg)
    finally:
        torch.set_num_threads(threads)
    if metrics.get("interrupted"):
        raise KeyboardInterrupt
    (out / "DONE").write_text(json.dumps({**metrics, "steps": cfg.steps}))
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


def rl_overrides(folder: Path, sft: Path, data: Path, steps: int, train_mtp: bool, seed: int,
                 extra: list[str] = ()) -> list[str]:
    """One RL run's overrides of RL_CONFIG (recipes/quickstart_cpu.sh passes the same)."""
    return [
        f"actor_rollout_ref.model.path={sft}", f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}", f"trainer.total_training_steps={steps}", f"trainer.seed={seed}",
        f"trainer.log_dir={folder}", f"trainer.default_local_dir={folder / 'ckpt'}",
        f"trainer.experiment_name=quickstart_{folder.name}", f"actor_rollout_ref.model.mtp.enable_train={train_mtp}",
        *extra,
    ]


def arm_overrides(arm: str) -> list[str]:
    """What one arm of the shift scenario changes: MTP frozen, or trained with this loss type."""
    if arm == "frozen":
        return []
    return [f"actor_rollout_ref.model.mtp.loss_type={arm}"]


def stage_rl(run: Path, name: str, sft: Path, data: Path, steps: int, train_mtp: bool, seed: int,
             extra: list[str] = (), label: str | None = None) -> Path:
    import ray

    from verl_mtp.config import load_config
    from verl_mtp.trainer.ray_trainer import run as run_rl

    folder = run / name
    final = folder / "ckpt" / f"global_step_{steps}" / "actor"
    if (final / "model.safetensors").exists():
        return final
    _say(label or f"stage {'4' if train_mtp else '5'}/6 {name}: DAPO with MTP heads "
                  f"{'trained jointly' if train_mtp else 'frozen (control)'} for {steps} steps")
    cfg = load_config(rl_overrides(folder, sft, data, steps, train_mtp, seed, extra), config_name=RL_CONFIG)
    if not ray.is_initialized():  # one Ray for both RL runs, quiet: the trainer prints its own progress
        # nothing else runs meanwhile: the policy worker generates and trains on two threads, 1.5x faster
        # than on one on the 2-core box (docs/benchmarks.md); workers read VERL_MTP_THREADS
        threads = os.environ.get("VERL_MTP_THREADS", str(min(2, os.cpu_count() or 1)))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"VERL_MTP_THREADS": threads}})
    previous = os.environ.get("TENSORBOARD_DIR")
    os.environ["TENSORBOARD_DIR"] = str(folder / "tensorboard")  # the event files stay in the run folder
    try:
        run_rl(cfg)
    finally:
        if previous is None:
            os.environ.pop("TENSORBOARD_DIR")
        else:
            os.environ["TENSORBOARD_DIR"] = previous
    return final


def stage_eval(run: Path, tok_dir: Path, data: Path, models: dict[str, Path], started: float,
               limit: int = 512) -> dict:
    from verl_mtp.trainer.evaluate import write_eval_report

    _say("stage 6/6 eval: held-out accuracy, acceptance, speed")
    runs = {name: run / name for name in models if (run / name / "metrics.jsonl").exists()}
    return write_eval_report(models, tok_dir, data / "test.parquet", run / "report", runs, limit, started)


def stage_shift(run: Path, sft: Path, data: Path, steps: int, seed: int, arms: list[str], extra: list[str]
                ) -> dict[str, Path]:
    """One RL run per arm with the shift scenario's settings, all from the same SFT model."""
    models = {}
    for i, arm in enumerate(arms):
        models[f"shift_{arm}"] = stage_rl(
            run, f"shift_{arm}", sft, data, steps, arm != "frozen", seed,
            [*SCENARIOS["shift"]["overrides"], *arm_overrides(arm), *extra],
            label=f"stage 4/6 shift arm {i + 1}/{len(arms)} ({arm}): DAPO with a format reward, MTP "
                  f"{'frozen' if arm == 'frozen' else f'trained with loss_type={arm}'}, {steps} steps")
    return models


SPEED_BATCH = 8  # on this CPU speculation pays at batch 1-8, not at the eval's 64 (docs/benchmarks.md)


def rollout_speed(model_dir: Path, tok_dir: Path, test_parquet: Path, batch: int = SPEED_BATCH, limit: int = 64,
                  repeats: int = 2) -> dict[str, float]:
    """Rollout tokens/s of one model at `batch` sequences, sampled at T=1 as RL samples, plain and with
    its draft at depth 2 (alternated, best of `repeats`: other processes share the cores)."""
    import pyarrow.parquet as pq

    from verl_mtp.data.tokenizer import encode_chat
    from verl_mtp.models import MTPCausalLM
    from verl_mtp.rollout import NativeEngine, SamplingParams
    from verl_mtp.trainer.setup import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    prompts = [encode_chat(tok, r["prompt"]) for r in pq.read_table(test_parquet).to_pylist()[:limit]]
    engine = NativeEngine(MTPCausalLM.from_pretrained(model_dir), tok, max_batch_size=batch,
                          max_seq_len=max(map(len, prompts)) + 64)
    params = SamplingParams(temperature=1.0, max_new_tokens=64, stop_token_ids=[tok.eos_token_id], seed=0)
    best = {"plain": 0.0, "speculative_2": 0.0}
    for _ in range(repeats):
        for key, depth in (("plain", 0), ("speculative_2", 2)):
            best[key] = max(best[key], engine.generate(prompts, params, speculative=depth).tokens_per_s)
    return best


def shift_lines(summary: dict, run: Path, speeds: dict[str, dict] | None = None) -> list[str]:
    """The shift experiment per arm: accept length after RL as a fraction of the post-SFT model's (the
    eval's sampled pass, the same prompts and settings for every model), the expected acceptance per
    depth from training and the rollout's accept length and response length (first and last 10 steps'
    mean), held-out accuracy, rollout tokens/s at SPEED_BATCH (`speeds`, from rollout_speed); then the
    issue's targets as PASS / MISS rows."""
    from verl_mtp.observability.report import read_metrics

    results, speeds = summary["models"], speeds or {}
    base = results["sft"]

    def speed(name: str) -> str:
        s = speeds.get(name)
        return (f"{s['plain']:.0f} | {s['speculative_2']:.0f} | {s['speculative_2'] / s['plain']:.2f}x"
                if s else "- | - | -")

    lines = ["| arm | accept length | kept vs post-SFT | expected accept rate d1, d2 (first -> last 10 steps) | "
             "rollout accept length (first -> last 10 steps) | response length (first -> last 10 steps) | "
             f"acc greedy | acc sampled | tok/s plain, batch {SPEED_BATCH} | tok/s depth 2 | speedup |",
             "|---" * 11 + "|",
             f"| post-SFT | {base['accept_length/sampled']:.3f} | 1.000 | | | | {base['acc/greedy']:.3f} | "
             f"{base['acc/sampled']:.3f} | {speed('sft')} |"]
    kept, acc = {}, {}
    for name, r in results.items():
        if not name.startswith("shift_"):
            continue
        arm = name[len("shift_"):]
        kept[arm], acc[arm] = r["accept_length/sampled"] / base["accept_length/sampled"], r["acc/greedy"]
        rows = read_metrics(str(run / name))[0]
        rates = ", ".join(_first_last(rows, f"mtp/expected_accept_rate_{k}") for k in (1, 2))
        lines.append(f"| {arm} | {r['accept_length/sampled']:.3f} | {kept[arm]:.3f} | {rates} | "
                     f"{_first_last(rows, 'rollout/accept_length')} | {_first_last(rows, 'response_length/mean')} | "
                     f"{r['acc/greedy']:.3f} | {r['acc/sampled']:.3f} | {speed(name)} |")
    return lines + ["", *target_lines(kept, acc, base["acc/greedy"])]


def target_lines(kept: dict[str, float], acc: dict[str, float], base_acc: float) -> list[str]:
    """The issue's targets, one PASS / MISS row each: the frozen draft loses >= 15 % of its post-SFT accept
    length (else the scenario is no test), every trained draft keeps >= 95 %, the best of the new objectives
    (soft_ce, tv) keeps at least as much as ce, and RL does not cost held-out greedy accuracy. The MTP loss
    is detached from the policy here (`detach_encoder`), so every arm updates its policy by the same rule
    and the arms' accuracies differ only by the rollout's random draws: accuracy is one row, their mean,
    with the spread."""
    def row(ok: bool, text: str) -> str:
        return f"| {'PASS' if ok else 'MISS'} | {text} |"

    lines = ["| target | measured |", "|---|---|"]
    if "frozen" in kept:
        lines.append(row(kept["frozen"] <= 0.85, f"frozen draft keeps <= 0.85 of its post-SFT accept length: "
                                                 f"{kept['frozen']:.3f}"))
    trained = {arm: v for arm, v in kept.items() if arm != "frozen"}
    for arm, v in trained.items():
        lines.append(row(v >= 0.95, f"{arm} draft keeps >= 0.95: {v:.3f}"))
    new = {arm: v for arm, v in trained.items() if arm != "ce"}
    if "ce" in trained and new:
        best = max(new, key=new.get)
        lines.append(row(new[best] >= trained["ce"], f"best new objective ({best}: kept {new[best]:.3f}) at least "
                                                     f"as good as ce (kept {trained['ce']:.3f})"))
    if acc:
        mean = sum(acc.values()) / len(acc)
        lines.append(row(mean >= base_acc, f"held-out greedy accuracy of the RL arms, mean {mean:.3f} (range "
                                           f"{min(acc.values()):.3f}-{max(acc.values()):.3f}) >= post-SFT {base_acc:.3f}"))
    return lines


def plot_shift(run: Path, names: list[str]) -> None:
    """report/shift_*.png: the arms' rollout accept length and training's expected acceptance per depth
    over the RL steps."""
    from verl_mtp.observability.report import plot_runs, read_metrics

    rows = {name[len("shift_"):]: read_metrics(str(run / name))[0] for name in names}
    plot_runs(rows, "rollout/accept_length", str(run / "report" / "shift_accept_length.png"),
              "rollout accept length (depth 2, T=1) over RL steps")
    for k in (1, 2):
        plot_runs(rows, f"mtp/expected_accept_rate_{k}", str(run / "report" / f"shift_expected_accept_rate_{k}.png"),
                  f"expected accept rate, depth {k} (training)")


def _first_last(rows: list[dict], key: str, n: int = 10) -> str:
    values = [r[key] for r in rows if key in r]
    if not values:
        return "-"
    return f"{sum(values[:n]) / len(values[:n]):.3f} -> {sum(values[-n:]) / len(values[-n:]):.3f}"


def main(argv: list[str] | None = None) -> int:
    from verl_mtp.cli import OneLineParser

    ap = OneLineParser(prog="verl-mtp quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="run folder (default: runs/quickstart, runs/shift for --scenario shift)")
    ap.add_argument("--rl-steps", type=int, default=40, help="DAPO steps per RL run")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: the SFT stage's)")
    ap.add_argument("--teacher-slip", type=float, default=0.5,
                    help="probability that the SFT corpus's teacher drops a carry or borrow (0: a perfect teacher)")
    ap.add_argument("--no-control", action="store_true", help="skip the enable_train=false control run")
    ap.add_argument("--fresh", action="store_true", help="delete the run folder first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=512, help="held-out prompts evaluated per model")
    ap.add_argument("--scenario", choices=tuple(SCENARIOS), default="default",
                    help="shift: SFT on traces in mixed layouts, then one RL run per --arms under a format "
                         "reward that selects one layout")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help=f"--scenario shift's arms, comma-separated from {','.join(ARMS)}")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for both RL runs")
    args = ap.parse_args(argv)
    if args.rl_steps < 1:
        ap.error("--rl-steps must be >= 1")
    if args.eval_limit < 1:
        ap.error("--eval-limit must be >= 1")
    if not 0.0 <= args.teacher_slip <= 1.0:
        ap.error(f"--teacher-slip must be in [0, 1], got {args.teacher_slip}")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or len(set(arms)) != len(arms):
        ap.error(f"--arms {args.arms!r}: expected distinct arms from {','.join(ARMS)}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"RL override {bad[0]!r} is not KEY=VALUE")
    if args.overrides:  # a bad key fails here, in one line, not after the SFT stage
        from verl_mtp.config import ConfigError, load_config
        from verl_mtp.config.ignored import check_ignored
        from verl_mtp.config.validate import check_runnable

        try:
            cfg = load_config(args.overrides, config_name=RL_CONFIG)
            check_runnable(cfg)
            check_ignored(cfg)  # as `verl-mtp dapo` does: a warning line per ignored key, or an error
        except ConfigError as e:
            ap.error(str(e))
    import torch

    from verl_mtp.algos.dynamic_sampling import FilterGroupsExhausted

    # a tiny model gains little from more threads, and OpenMP threads collapse when the cores are shared
    torch.set_num_threads(1)
    scenario = SCENARIOS[args.scenario]
    run = Path(args.out or scenario["out"])
    if args.fresh:
        shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        data = stage_data(run, args.seed, args.teacher_slip, scenario["trace_forms"])
        tok = stage_tokenizer(run, data, scenario["isolate_spaces"])
        sft = stage_warmup(run, stage_sft(run, data, tok, args.seed, args.sft_steps), data, tok)
        if args.scenario == "shift":
            models = {"sft": sft, **stage_shift(run, sft, data, args.rl_steps, args.seed, arms, args.overrides)}
            summary = stage_eval(run, tok, data, models, started, args.eval_limit)
            speeds = {name: rollout_speed(path, tok, data / "test.parquet") for name, path in models.items()}
            (run / "report" / "shift_speeds.json").write_text(json.dumps(speeds, indent=2))
            lines = shift_lines(summary, run, speeds)
            plot_shift(run, [name for name in models if name != "sft"])
            (run / "report" / "shift.md").write_text("\n".join(["# Shift scenario", "", *lines, ""]))
            print("\n".join(lines), flush=True)
            return 0
        models = {"sft": sft, "rl": stage_rl(run, "rl", sft, data, args.rl_steps, True, args.seed, args.overrides)}
        if not args.no_control:
            models["rl_control"] = stage_rl(run, "rl_control", sft, data, args.rl_steps, False, args.seed,
                                            args.overrides)
        stage_eval(run, tok, data, models, started, args.eval_limit)
    except KeyboardInterrupt:
        _say(f"interrupted; run the same command again to resume from {run}")
        return 130
    except (QuickstartError, FilterGroupsExhausted) as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
