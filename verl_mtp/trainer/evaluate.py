"""Evaluate model folders on a held-out verl parquet and write the report: the quickstart's last stage.

    verl-mtp eval --tokenizer TOK --test data/test.parquet --out REPORT_DIR \\
        [--run rl=RUN_DIR ...] [--limit 512] NAME=MODEL_DIR [NAME=MODEL_DIR ...]

For each model: held-out accuracy (greedy; sampled at T=1 over 4 samples), accept length and per-depth
accept rate of its MTP draft at depth 2, and batch-64 generation speed plain / depth 2 / adaptive. Each
`--run NAME=DIR` is an RL run folder (its metrics.jsonl): the report overlays their curves (held-out
accuracy, accept length, train accuracy, reward, response length) and writes each run's own report.
Output: REPORT_DIR/summary.{json,md} and PNGs; the table is also printed.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

# the curves a quickstart-style comparison is judged by, overlaid across runs
CURVES = ("val-core/synthetic_math/acc/mean@1", "rollout/accept_length", "critic/acc/mean", "critic/score/mean",
          "response_length/mean")
COLUMNS = ("acc/greedy", "acc/sampled", "accept_length/sampled", "accept_rate_1/sampled", "accept_rate_2/sampled",
           "tokens_per_s/plain", "tokens_per_s/speculative_2", "tokens_per_s/auto")
SPEED_ARMS = {"plain": 0, "speculative_2": 2, "auto": "auto"}  # greedy passes timed side by side
SPEED_REPEATS = 3  # side-by-side runs of those passes; each arm's median rate is reported
PASSES = len(SPEED_ARMS) * SPEED_REPEATS + 1  # generation passes per model: the timed ones, then sampled
WARMUP_PROMPTS = 128  # each speed arm's engine generates over these first (two batches: admission included)


def held_out(tok, test_parquet: Path | str, limit: int | None = None) -> tuple[list[dict], list[list[int]]]:
    """The rows of a verl parquet (`prompt`, `reward_model.ground_truth`), at most `limit` (None: all), and
    their chat-templated prompt ids."""
    import pyarrow.parquet as pq

    from verl_mtp.data.tokenizer import encode_chat

    rows = pq.read_table(test_parquet).to_pylist()[: limit or None]
    if not rows:
        raise ValueError(f"{test_parquet}: no rows")
    return rows, [encode_chat(tok, r["prompt"]) for r in rows]


def held_out_engine(model, tok, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 64):
    """The native rollout engine sized for `prompts` and `max_new_tokens`."""
    from verl_mtp.rollout import NativeEngine

    return NativeEngine(model, tok, max_batch_size=min(batch_size, len(prompts)),
                        max_seq_len=max(map(len, prompts)) + max_new_tokens)


def correct(row: dict, text: str) -> bool:
    """Graded as the RL reward grades it (the grader is routed by the row's data source)."""
    from verl_mtp.rewards.scorers import default_compute_score

    result = default_compute_score(row.get("data_source", "synthetic_math"), text,
                                   str(row["reward_model"]["ground_truth"]))
    return bool(result["acc"]) if isinstance(result, dict) else result > 0


def graded(tok, rows: list[dict], out) -> list[float]:
    """1.0 / 0.0 per sample of a generation over `rows` (prompt-major, n samples each)."""
    n = len(out.samples) // len(rows)
    return [float(correct(rows[i // n], tok.decode(s.token_ids, skip_special_tokens=True)))
            for i, s in enumerate(out.samples)]


def accuracy(model, tok, test_parquet: Path | str, limit: int | None = None, speculative: int = 2,
             max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, float]:
    """Greedy accuracy on a held-out parquet, drafting `speculative` tokens per step with the MTP layers
    (greedy speculation is exact, so the accuracy does not depend on it). Returns acc, acc/level_{l}
    when rows carry `extra_info.level`, accept_length (tokens per target pass), tokens_per_s, seconds
    and n. The model's train/eval mode is left as it was."""
    from collections import defaultdict

    from verl_mtp.rollout import SamplingParams

    rows, prompts = held_out(tok, test_parquet, limit)
    engine = held_out_engine(model, tok, prompts, max_new_tokens, batch_size)
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_token_ids=[tok.eos_token_id])
    was_training = model.training
    out = engine.generate(prompts, params, speculative=speculative if model.num_mtp_layers else 0)
    model.train(was_training)
    scores, by_level = graded(tok, rows, out), defaultdict(list)
    for score, row in zip(scores, rows):
        level = (row.get("extra_info") or {}).get("level")
        if level is not None:
            by_level[f"level_{level}"].append(score)
    result = {"acc": sum(scores) / len(rows)}
    result.update({f"acc/{k}": sum(v) / len(v) for k, v in sorted(by_level.items())})
    result.update(accept_length=out.stats.accept_length, tokens_per_s=out.tokens_per_s, seconds=out.seconds,
                  n=float(len(rows)))
    return result


def side_by_side(arms: dict, prompts: list[list[int]], params) -> dict[str, tuple]:
    """Run one generation per arm ({name: (engine, speculative)}, an engine each) a round at a time in
    turn, each arm timed over its own rounds only: arms share the machine's moments, so a drift of its
    speed (on a shared box, up to 25 % between identical back-to-back passes) falls on all of them alike.
    Returns {name: (GenerateOutput, seconds, tokens/s)}."""
    running = {name: engine.rounds(prompts, params, speculative=depth) for name, (engine, depth) in arms.items()}
    seconds, outs = dict.fromkeys(running, 0.0), {}
    order = random.Random(0)
    while running:
        # a new order every turn: an arm's round runs after a random other arm's, whose memory traffic
        # leaves the caches colder (a fixed cycle would always put the same arm after the heaviest)
        for name in order.sample(list(running), len(running)):
            t0 = time.perf_counter()
            try:
                next(running[name])
            except StopIteration as finished:
                outs[name] = finished.value
                del running[name]
            seconds[name] += time.perf_counter() - t0
    return {name: (out, seconds[name], out.num_tokens / seconds[name]) for name, out in outs.items()}


def warmed_engines(model, tok, prompts: list[list[int]], arms: dict, params, warmup: int = WARMUP_PROMPTS) -> dict:
    """{name: (engine, depth)} for `side_by_side`, each engine having generated once over the first `warmup`
    prompts at its arm's depth: the state the rollout engine is in on every step of an RL run but the
    first (adaptive depth has measured this machine's costs, every arm's buffers are warm). `warmup=0`:
    cold engines, as on a run's first rollout (adaptive depth then probes: bench/eval_auto.py --cold)."""
    engines = {name: (held_out_engine(model, tok, prompts), depth) for name, depth in arms.items()}
    if warmup:
        for engine, depth in engines.values():
            engine.generate(prompts[:warmup], params, speculative=depth)
    return engines


def evaluate(model_dir: Path, tok, test_parquet: Path, limit: int = 512, tick=lambda: None) -> dict[str, float]:
    """Held-out accuracy (greedy; sampled at T=1 over 4 samples), accept length per depth at the
    rollout's settings, and generation speed plain / depth 2 / adaptive (batch 64): the three greedy
    passes run side by side a round at a time on an engine each (`side_by_side`), so the machine's
    drift does not count for or against speculation, SPEED_REPEATS times, each arm's median rate
    reported. Each engine has generated once before it is timed (`warmed_engines`): adaptive depth is
    timed as it runs on every rollout of an RL run after the first, its one-off cold probe left out
    (bench/eval_auto.py --cold measures it). `tick()` is called after each of the PASSES generation
    passes."""
    from verl_mtp.models import MTPCausalLM
    from verl_mtp.rollout import SamplingParams

    model = MTPCausalLM.from_pretrained(model_dir)
    rows, prompts = held_out(tok, test_parquet, limit)
    stop = [tok.eos_token_id]

    def mean(out) -> float:
        scores = graded(tok, rows, out)
        return sum(scores) / len(scores)

    greedy = SamplingParams(temperature=0, max_new_tokens=64, stop_token_ids=stop)
    engines = warmed_engines(model, tok, prompts, SPEED_ARMS, greedy)
    runs = []
    for _ in range(SPEED_REPEATS):  # one pass on this shared box is +-3 %: the target is a 3 % band
        runs.append(side_by_side(engines, prompts, greedy))
        for _ in SPEED_ARMS:
            tick()
    timed = runs[0]  # greedy: every repeat generates the same tokens
    result = {"acc/greedy": mean(timed["plain"][0]), "accept_length/greedy": timed["speculative_2"][0].stats.accept_length}
    result.update({f"tokens_per_s/{name}": statistics.median(run[name][2] for run in runs) for name in SPEED_ARMS})
    sampled = held_out_engine(model, tok, prompts).generate(
        prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=64, stop_token_ids=stop, seed=0), speculative=2)
    tick()
    result["acc/sampled"] = mean(sampled)
    result["accept_length/sampled"] = sampled.stats.accept_length
    for k in range(1, 3):
        result[f"accept_rate_{k}/sampled"] = sampled.stats.accept_rate(k)
    return result


def write_eval_report(models: dict[str, Path], tok_dir: Path, test_parquet: Path, report: Path,
                      runs: dict[str, Path] | None = None, limit: int = 512, started: float | None = None) -> dict:
    """Evaluate every model, plot the runs' curves, write summary.json / summary.md into `report`, print
    the table; `started` (a time.time()) adds the wall time since then."""
    from tqdm import tqdm

    from verl_mtp.observability.report import plot_runs, read_metrics, write_report
    from verl_mtp.trainer.setup import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    with tqdm(total=PASSES * len(models), desc="eval", unit="pass", file=sys.stderr, disable=None) as bar:
        results = {name: evaluate(path, tok, test_parquet, limit, tick=lambda: bar.update(1))
                   for name, path in models.items()}
    report.mkdir(parents=True, exist_ok=True)
    rows = {name: read_metrics(folder)[0] for name, folder in (runs or {}).items()}
    plots = {}
    for key in CURVES:
        path = report / f"{key.replace('/', '_').replace('@', '')}.png"
        if plot_runs(rows, key, str(path)):
            plots[key] = path.name
    for name, folder in (runs or {}).items():
        write_report(str(folder), str(report / name))
    summary = {"models": results, "plots": plots}
    if started is not None:
        summary["minutes"] = (time.time() - started) / 60
    (report / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = summary_lines(results, rows, summary.get("minutes"))
    (report / "summary.md").write_text("\n".join(["# Evaluation summary", "", *lines, ""] +
                                                 [f"![{k}]({v})" for k, v in plots.items()]))
    print("\n".join(lines), flush=True)
    return summary


def summary_lines(results: dict, runs: dict, minutes: float | None) -> list[str]:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if r[c] < 10 else f"{r[c]:.0f}" for c in COLUMNS) + " |")
    for name, rows in runs.items():
        accept = [r["rollout/accept_length"] for r in rows if "rollout/accept_length" in r]
        if accept:
            lines.append(f"- {name}: rollout accept length first {accept[0]:.3f}, last {accept[-1]:.3f}, "
                         f"min {min(accept):.3f} over {len(accept)} steps")
    if minutes is not None:
        lines.append(f"- wall time: {minutes:.1f} min")
    return lines


def _named_folders(ap, pairs: list[str], what: str, need: str) -> dict[str, Path]:
    """NAME=DIR pairs -> {name: Path}, each DIR holding `need`; one-line errors otherwise."""
    folders = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            ap.error(f"{what} {pair!r} is not NAME=DIR")
        if name in folders:
            ap.error(f"{what} name {name!r} is given twice")
        if not (Path(folder) / need).exists():
            ap.error(f"{what} {name}: {folder} has no {need}")
        folders[name] = Path(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    from verl_mtp.cli import OneLineParser

    ap = OneLineParser(prog="verl-mtp eval", description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="HF tokenizer folder")
    ap.add_argument("--test", required=True, help="held-out verl parquet (prompt, reward_model.ground_truth)")
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="RL run folder to plot")
    ap.add_argument("--limit", type=int, default=512, help="held-out prompts evaluated per model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL_DIR")
    args = ap.parse_args(argv)
    if args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    for flag, path in (("--tokenizer", Path(args.tokenizer) / "tokenizer.json"), ("--test", Path(args.test))):
        if not path.exists():
            ap.error(f"{flag}: {path} does not exist")
    models = _named_folders(ap, args.models, "model", "config.json")
    runs = _named_folders(ap, args.run, "--run", "metrics.jsonl")
    import torch

    torch.set_num_threads(args.threads)
    write_eval_report(models, Path(args.tokenizer), Path(args.test), Path(args.out), runs, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
