"""Plots and a markdown summary of a run, from its `metrics.jsonl`.

    verl-mtp report RUN_DIR                              # writes RUN_DIR/report/{report.md,*.png}
    verl-mtp report RUN_DIR --out DIR
    verl-mtp report runs/mtp_on --compare runs/mtp_off   # also overlays headline metrics of both runs

RUN_DIR is `trainer.log_dir` (or the metrics.jsonl itself). It may belong to a run still in progress:
a half-written last line is skipped. Plots are 800x450 px PNGs; none is written for a metric the run
never logged (e.g. acceptance when speculation is off).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from verl_mtp.observability.tracking import METRICS_FILE, format_duration

FIGSIZE = (8, 4.5)  # inches; at DPI this is 800x450 px
DPI = 100
# phases timed inside timing_s/step, in pipeline order; the rest of the step is shown as "other"
STEP_PHASES = ("gen", "reward", "old_log_prob", "ref", "adv", "update_actor", "update_weights")
# headline metrics overlaid by --compare
COMPARE_KEYS = ("rollout/accept_length", "rollout/accept_rate_1", "critic/score/mean", "critic/acc/mean",
                "rollout/tokens_per_s")
NAN = float("nan")

Row = dict[str, float]


# ---- reading ---------------------------------------------------------------------------------

def read_metrics(run_dir: str) -> tuple[list[Row], int]:
    """Rows of `run_dir/metrics.jsonl` sorted by step, and the number of unreadable lines skipped.

    A cut line (the last line of a run in progress, or one left by a killed run before it resumed)
    is skipped. A step logged twice (a run resumed from an older checkpoint) keeps its later row.
    Nulls (non-finite values) come back as NaN.
    """
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, METRICS_FILE)
    by_step: dict[int, Row] = {}
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            by_step[step] = {k: NAN if v is None else v for k, v in row.items()}
    return [by_step[s] for s in sorted(by_step)], skipped


def series(rows: Sequence[Row], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that logged `key`."""
    pairs = [(int(r["step"]), float(r[key])) for r in rows if key in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def depth_keys(rows: Sequence[Row], prefix: str) -> list[str]:
    """`{prefix}{d}` keys present in any row, by depth: rollout/accept_rate_1, rollout/accept_rate_2, ..."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    depths = {int(m.group(1)) for r in rows for k in r if (m := pattern.match(k))}
    return [f"{prefix}{d}" for d in sorted(depths)]


def val_source_keys(rows: Sequence[Row]) -> list[str]:
    pattern = re.compile(r"val-core/.+/acc/mean@\d+$")
    return sorted({k for r in rows for k in r if pattern.match(k)})


# ---- plotting --------------------------------------------------------------------------------

def _figure(ncols: int = 1):
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": every PNG keeps the same pixel size
    return path


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """TensorBoard-style debiased exponential moving average; NaNs are skipped, not propagated."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm if norm else NAN)
    return out


def _line(ax, steps: list[int], values: list[float], label: str, **kw) -> None:
    """Few points: markers. Many (noisy RL curves): the raw line faint and its moving average on top."""
    if len(steps) < 20:
        ax.plot(steps, values, marker="o", markersize=3, label=label, **kw)
        return
    (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=1, **kw)
    ax.plot(steps, smooth(values), color=raw.get_color(), label=label, **kw)


def _band(ax, rows: Sequence[Row], low: str, high: str) -> None:
    steps, lo = series(rows, low)
    steps_hi, hi = series(rows, high)
    if steps and steps == steps_hi:
        ax.fill_between(steps, lo, hi, alpha=0.15, label=f"{low.rsplit('/', 1)[-1]}..{high.rsplit('/', 1)[-1]}")


def plot_reward(rows: Sequence[Row], path: str) -> str | None:
    if not series(rows, "critic/score/mean")[0]:
        return None
    fig, (ax,) = _figure()
    _line(ax, *series(rows, "critic/score/mean"), "score mean")
    if series(rows, "critic/rewards/mean") != series(rows, "critic/score/mean"):  # overlong / KL shaping applied
        _line(ax, *series(rows, "critic/rewards/mean"), "shaped reward mean", linestyle="--")
    ax.set_title("Reward")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_accuracy(rows: Sequence[Row], path: str) -> str | None:
    sources = val_source_keys(rows)
    keys = ["critic/acc/mean", "val-core/acc"] + (sources if len(sources) > 1 else [])
    if not any(series(rows, k)[0] for k in keys):
        return None
    fig, (ax,) = _figure()
    _line(ax, *series(rows, "critic/acc/mean"), "train acc")
    for key in keys[1:]:
        steps, values = series(rows, key)
        if steps:  # validation runs every test_freq steps: markers, never smoothed
            label = "val acc" if key == "val-core/acc" else "val " + key.split("/")[1]
            ax.plot(steps, values, marker="s", markersize=4, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_acceptance(rows: Sequence[Row], path: str) -> str | None:
    """Left: accept length, observed (solid) and expected from the training forward (dashed). Right:
    rollout acceptance per depth (solid) against its expectation from training, P(drafts 1..k kept)
    (dashed), and the MTP heads' top-1 accuracy (dotted): observed falling below expected is a draft
    the rollout did not get; both falling is an undertrained draft."""
    rates = depth_keys(rows, "rollout/accept_rate_")
    if not series(rows, "rollout/accept_length")[0] and not rates:
        return None
    fig, (left, right) = _figure(ncols=2)
    _line(left, *series(rows, "rollout/accept_length"), "accept length")
    steps, values = series(rows, "mtp/expected_accept_length")
    if steps:
        color = left.get_lines()[-1].get_color() if left.get_lines() else None
        left.plot(steps, values, linestyle="--", color=color, alpha=0.8, label="expected")
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    left.set_title("Accept length (tokens / verify pass)")
    for key in rates:
        depth = key.rsplit("_", 1)[1]
        _line(right, *series(rows, key), f"accept rate d{depth}")
        color = right.get_lines()[-1].get_color()
        for key, style, label in ((f"mtp/expected_chain_accept_rate_{depth}", "--", "expected"),
                                  (f"mtp/acc_{depth}", ":", "mtp acc")):
            steps, values = series(rows, key)
            if steps:
                right.plot(steps, values, linestyle=style, color=color, alpha=0.8, label=f"{label} d{depth}")
    right.set_ylim(-0.02, 1.02)
    right.set_title("Acceptance per depth")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_response_length(rows: Sequence[Row], path: str) -> str | None:
    if not series(rows, "response_length/mean")[0]:
        return None
    fig, (ax,) = _figure()
    _band(ax, rows, "response_length/min", "response_length/max")
    _line(ax, *series(rows, "response_length/mean"), "mean")
    ax.set_ylabel("tokens")
    steps, clip = series(rows, "response_length/clip_ratio")
    if steps:
        twin = ax.twinx()
        twin.plot(steps, clip, color="tab:red", linestyle=":", label="clip ratio")
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("clip ratio")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("Response length")
    return _save(fig, path)


def step_time_breakdown(rows: Sequence[Row]) -> tuple[list[int], dict[str, list[float]]]:
    """Per step: seconds in each phase, "other" (the rest of timing_s/step) and "testing" (validation,
    timed outside the step). Phases never logged are left out."""
    timed = [r for r in rows if "timing_s/step" in r]
    names = [p for p in STEP_PHASES if any(f"timing_s/{p}" in r for r in timed)]
    parts: dict[str, list[float]] = {p: [] for p in names}
    parts["other"], testing = [], []
    for r in timed:
        inside = 0.0
        for p in names:
            value = r.get(f"timing_s/{p}", 0.0)
            parts[p].append(value)
            inside += value
        parts["other"].append(max(r["timing_s/step"] - inside, 0.0))
        testing.append(r.get("timing_s/testing", 0.0))
    if any(testing):
        parts["testing"] = testing
    return [int(r["step"]) for r in timed], parts


def plot_step_time(rows: Sequence[Row], path: str) -> str | None:
    steps, parts = step_time_breakdown(rows)
    if not steps:
        return None
    fig, (ax,) = _figure()
    if len(steps) == 1:  # an area needs two points
        bottom = 0.0
        for name, values in parts.items():
            ax.bar(steps, values, bottom=bottom, label=name)
            bottom += values[0]
    else:  # steps, not ramps: validation ("testing") happens on single steps
        ax.stackplot(steps, list(parts.values()), labels=list(parts), alpha=0.85, step="mid")
    ax.set_ylabel("seconds")
    ax.set_title("Step time by phase")
    fig.legend(loc="outside right upper", fontsize="small")  # beside the plot: the areas fill it
    return _save(fig, path)


def plot_runs(runs: dict[str, Sequence[Row]], key: str, path: str, title: str | None = None) -> str | None:
    """Overlay `key` from several runs ({label: rows}) on one plot, e.g. accept length with MTP
    training on vs off. Returns None (and writes nothing) when no run logged `key`."""
    if not any(series(rows, key)[0] for rows in runs.values()):
        return None
    fig, (ax,) = _figure()
    for label, rows in runs.items():
        steps, values = series(rows, key)
        if steps:
            _line(ax, steps, values, label)
    ax.set_title(title or key)
    ax.legend(loc="best")
    return _save(fig, path)


PLOTS: dict[str, Callable[[Sequence[Row], str], str | None]] = {
    "reward.png": plot_reward,
    "accuracy.png": plot_accuracy,
    "acceptance.png": plot_acceptance,
    "response_length.png": plot_response_length,
    "step_time.png": plot_step_time,
}


# ---- summary ---------------------------------------------------------------------------------

# (key, what it is, which way is better: "max", "min" or None)
SUMMARY = (
    ("critic/score/mean", "reward (score mean)", "max"),
    ("critic/acc/mean", "train accuracy", "max"),
    ("val-core/acc", "validation accuracy", "max"),
    ("rollout/accept_length", "accept length", "max"),
    ("rollout/tokens_per_s", "rollout tokens/s", "max"),
    ("response_length/mean", "response length", None),
    ("response_length/clip_ratio", "clipped responses", None),
    ("actor/pg_loss", "policy loss", None),
    ("actor/entropy", "entropy", None),
    ("mtp/loss", "MTP loss (scaled)", None),
    ("timing_s/step", "step time (s)", "min"),
    ("trainer/weight_version", "weight version", None),
)


def _fmt(value: float) -> str:
    return "NaN" if not math.isfinite(value) else f"{value:.4g}"


def summary_rows(rows: Sequence[Row]) -> list[tuple[str, str, str, str, str]]:
    """(metric, key, first, last, best) for each summary metric the run logged; NaNs are ignored
    when picking first, last and best."""
    keys = list(SUMMARY)
    after_accept_length = [key for key, *_ in keys].index("rollout/accept_length") + 1
    rates = depth_keys(rows, "rollout/accept_rate_")
    keys[after_accept_length:after_accept_length] = [(k, f"accept rate, depth {k.rsplit('_', 1)[1]}", "max")
                                                     for k in rates]
    keys += [(k, f"MTP head accuracy, depth {k.rsplit('_', 1)[1]}", "max") for k in depth_keys(rows, "mtp/acc_")]
    keys += [(k, f"validation accuracy, {k.split('/')[1]}", "max") for k in val_source_keys(rows)]
    out = []
    for key, label, better in keys:
        points = [(s, v) for s, v in zip(*series(rows, key)) if math.isfinite(v)]
        if not points:
            continue
        (s0, v0), (s1, v1) = points[0], points[-1]
        best = "-"
        if better:
            sb, vb = (max if better == "max" else min)(points, key=lambda p: p[1])
            best = f"{_fmt(vb)} (step {sb})"
        out.append((label, f"`{key}`", f"{_fmt(v0)} (step {s0})", f"{_fmt(v1)} (step {s1})", best))
    return out


def health_lines(rows: Sequence[Row]) -> list[str]:
    """Restarts, skipped NaN updates, reward failures and non-finite logged values."""
    last = rows[-1] if rows else {}
    lines = [f"- worker restarts: {last.get('trainer/worker_restarts', 0):.0f}",
             f"- updates skipped for NaN/inf: {last.get('trainer/nan_skipped_steps', 0):.0f}"]
    kinds = sorted({k for r in rows for k in r if k.startswith("reward/failures_")})
    failures = {k.removeprefix("reward/failures_"): sum(r.get(k, 0.0) for r in rows) for k in kinds}
    lines.append("- reward failures: " + (", ".join(f"{kind} {n:g}" for kind, n in failures.items()) or "none logged"))
    non_finite = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)})
    if non_finite:
        lines.append("- non-finite values logged for: " + ", ".join(f"`{k}`" for k in non_finite))
    return lines


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def _timing_table(rows: Sequence[Row]) -> list[str]:
    steps, parts = step_time_breakdown(rows)
    if not steps:
        return []
    total = sum(sum(v) for name, v in parts.items() if name != "testing")
    body = [(name, f"{sum(v) / len(v):.3g}", f"{100 * sum(v) / total:.1f}%" if name != "testing" and total else "-")
            for name, v in parts.items()]
    return ["## Step time", ""] + _table(("phase", "mean s/step", "share of step"), body) + [""]


def write_report(run_dir: str, out_dir: str | None = None, compare: dict[str, Sequence[Row]] | None = None) -> str:
    """Write the PNGs and `report.md` into `out_dir` (default RUN_DIR/report); returns report.md's path.
    `compare` ({label: rows} of other runs) adds overlays of the headline metrics against this run."""
    rows, skipped = read_metrics(run_dir)
    run_folder = _run_folder(run_dir)
    out_dir = out_dir or os.path.join(run_folder, "report")
    os.makedirs(out_dir, exist_ok=True)
    pngs = {name: plot(rows, os.path.join(out_dir, name)) for name, plot in PLOTS.items()}
    lines = [f"# Run report: {_label(run_folder)}", "", f"- run folder: `{os.path.abspath(run_folder)}`"]
    if rows:
        written = rows[-1].get("time", NAN)
        when = "-" if not math.isfinite(written) else (
            f"{datetime.datetime.fromtimestamp(written, datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, "
            f"{format_duration(max(time.time() - written, 0))} before this report")
        lines += [f"- steps logged: {len(rows)} (step {rows[0]['step']:.0f} to {rows[-1]['step']:.0f})",
                  f"- last row written: {when}"]
    else:
        lines.append("- no complete rows yet")
    if skipped:
        lines.append(f"- unreadable lines skipped: {skipped} (a line cut by a run in progress or a kill)")
    lines += ["", "## Summary", ""]
    lines += _table(("metric", "key", "first", "last", "best"), summary_rows(rows)) + [""]
    lines += ["## Health", ""] + health_lines(rows) + [""]
    lines += _timing_table(rows)
    lines += ["## Plots", ""]
    for name, path in pngs.items():
        title = name.removesuffix(".png").replace("_", " ")
        lines.append(f"![{title}]({name})" if path else f"- {title}: not logged by this run")
        lines.append("")
    if compare:
        runs = {_label(run_folder): rows, **compare}
        lines += ["## Comparison: " + " vs ".join(runs), ""]
        for key in COMPARE_KEYS:
            name = "compare_" + re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_") + ".png"
            if plot_runs(runs, key, os.path.join(out_dir, name)):
                lines += [f"![{key}]({name})", ""]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return report


def _run_folder(path: str) -> str:
    """RUN_DIR given either as the folder or as its metrics.jsonl."""
    return (os.path.dirname(path) or ".") if os.path.isfile(path) else path


def _label(run_folder: str) -> str:
    return os.path.basename(os.path.abspath(run_folder))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verl-mtp report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="trainer.log_dir of the run (holding metrics.jsonl), or the file itself")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                        help="other runs whose headline metrics are overlaid on this run's")
    args = parser.parse_args(argv)
    try:
        compare = {}
        for other in args.compare:
            label = _label(_run_folder(other))
            while label in compare or label == _label(_run_folder(args.run_dir)):
                label += "'"
            compare[label] = read_metrics(other)[0]
        report = write_report(args.run_dir, args.out, compare)
    except FileNotFoundError as err:
        print(f"verl-mtp report: no metrics log: {err.filename} (is trainer.logger missing 'jsonl'?)",
              file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
