"""Profile our RL step in one process: bench/rl_step.py's model, data and config, with the worker groups
replaced by in-process objects (same worker classes, same driver), so a profiler sees the driver and the
workers together and the Ray transfer cost shows as the difference from bench/rl_step.py's phase times.

    python bench/rl_step_profile.py [--steps 4] [--threads 1] [--mtp] [--dtype float32|bfloat16]
                                    [--profile cprofile|torch|none] [--top 30]

Prints each step's phase times (the driver's timing_s/*), then the profile of steps 2.. (the first is
warm-up): cProfile's functions by own time, or torch.profiler's operators by self CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rl_step import step_arguments  # noqa: E402


class LocalGroup:
    """WorkerGroup's interface over plain objects in this process."""

    def __init__(self, cls, kwargs_per_rank, use_gpu, name):
        self.name = name
        self.workers = [cls(**kw) for kw in kwargs_per_rank]

    def __len__(self):
        return len(self.workers)

    def call(self, method, *args, **kwargs):
        return [getattr(w, method)(*args, **kwargs) for w in self.workers]

    def call_rank0(self, method, *args, **kwargs):
        return getattr(self.workers[0], method)(*args, **kwargs)

    def call_shards(self, method, shards, *args, **kwargs):
        return [getattr(w, method)(s, *args, **kwargs) for w, s in zip(self.workers, shards)]

    def shutdown(self):
        for w in self.workers:
            if hasattr(w, "close"):
                w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(ap, steps=4, threads=1)
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--profile", default="cprofile", choices=("cprofile", "torch", "none"))
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["VERL_MTP_THREADS"] = str(args.threads)
    import transformers

    import rl_step
    from verl_mtp.config import load_config
    from verl_mtp.trainer import ray_trainer

    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="rl_profile_"))
    model_dir, train_file = rl_step.build_assets(work, args.hidden, args.layers, args.mtp_layers)
    cfg = load_config(rl_step.ours_overrides(model_dir, train_file, args, args.mtp, work / "run", args.dtype))
    ray_trainer.WorkerGroup = LocalGroup
    trainer = ray_trainer.DAPOTrainer(cfg)
    profiler = None
    try:
        history = [trainer._step_and_validate()]  # warm-up
        if args.profile == "cprofile":
            profiler = cProfile.Profile()
            profiler.enable()
        elif args.profile == "torch":
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        while trainer.step < trainer.total_steps:
            history.append(trainer._step_and_validate())
        if args.profile == "cprofile":
            profiler.disable()
        elif args.profile == "torch":
            profiler.__exit__(None, None, None)
    finally:
        trainer.shutdown()
    phases = sorted({k for h in history for k in h if k.startswith("timing_s/")})
    print("step " + " ".join(f"{p.removeprefix('timing_s/'):>14}" for p in phases))
    for i, h in enumerate(history):
        print(f"{i + 1:>4} " + " ".join(f"{h.get(p, 0.0):>14.3f}" for p in phases))
    print("median of steps 2.. " + ", ".join(
        f"{p.removeprefix('timing_s/')} {statistics.median(h.get(p, 0.0) for h in history[1:]):.3f}" for p in phases))
    print(f"response length {statistics.mean(h['response_length/mean'] for h in history):.1f}")
    if args.profile == "cprofile":
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
    elif args.profile == "torch":
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
