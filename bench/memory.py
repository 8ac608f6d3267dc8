"""Per-rank training memory and step time of the three training engines at world 2 on CPU (gloo).

    python bench/memory.py [--steps 4] [--threads 1] [--out bench/results/memory.json]

The same model (hidden 256, 4 layers, vocabulary 4096, K=1 MTP layer; fp32) and the same global batch
of 8 rows (prompt 32 + response 32 tokens) through one PPO update per step (PolicyActor, MTP loss on):
  ddp       strategy=torch at 2 ranks: DDP, every rank holds everything, each trains on 4 rows
  fsdp2     strategy=fsdp2 at 2 ranks: parameters, gradients and AdamW moments sharded, 4 rows each
  megatron  strategy=megatron TP=2: layers split over the 2 ranks, both see all 8 rows
Per rank: bytes of the parameters it holds, of its gradients (torch / FSDP2: `param.grad` after the
backward, before the step; megatron: its DDP's fp32 `main_grad` buffers) and of its AdamW state, each
storage once; and the median wall time of a step (forward + backward + optimizer) after one warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from verl_mtp.batch import from_samples  # noqa: E402
from verl_mtp.config import load_config  # noqa: E402
from verl_mtp.engines.actor import PolicyActor  # noqa: E402
from verl_mtp.engines.base import build_engine  # noqa: E402
from verl_mtp.net import free_port  # noqa: E402
from verl_mtp.models import MTPCausalLM, ModelConfig  # noqa: E402

WORLD = 2
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, num_nextn_predict_layers=1, max_position_embeddings=128)
ARMS = {"ddp": ("torch", {}), "fsdp2": ("fsdp2", {}), "megatron": ("megatron", {"tensor_model_parallel_size": 2})}


def _batch(rows: int = 8, prompt: int = 32, response: int = 32):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, MODEL["vocab_size"], (rows, prompt), generator=g).tolist()
    responses = torch.randint(1, MODEL["vocab_size"], (rows, response), generator=g).tolist()
    b = from_samples(prompts, responses, [[0.0] * response] * rows, pad_id=0)
    return b.with_(advantages=torch.randn(b.responses.shape, generator=g) * b.response_mask)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _footprint(engine) -> dict[str, int]:
    """Bytes this rank holds: parameters, gradients (call between backward and step), AdamW state."""
    megatron = hasattr(engine, "gpt")
    params = list((engine.gpt if megatron else engine.module).parameters())
    grads = [getattr(p, "main_grad" if megatron else "grad") for p in params]
    adam = engine.optimizer.optimizer if megatron else engine.optimizer
    state = [t for s in adam.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"param_bytes": _storage_bytes(params), "grad_bytes": _storage_bytes(g for g in grads if g is not None),
            "optimizer_bytes": _storage_bytes(state)}


def _run_arm(name: str, model: MTPCausalLM, arr, batch, steps: int) -> dict:
    strategy, megatron = ARMS[name]
    engine = build_engine(strategy, model=copy.deepcopy(model), optim=OmegaConf.to_container(arr.actor.optim),
                          total_steps=steps + 1, num_mtp=1, mtp_detach=True, megatron=megatron)
    if engine.data_parallel_size > 1:  # data parallel: this rank's half of the rows
        rows = len(batch) // engine.data_parallel_size
        batch = batch.select(torch.arange(engine.data_parallel_rank * rows, (engine.data_parallel_rank + 1) * rows))
    actor, seen = PolicyActor(engine, arr), {}
    step = engine.optimizer_step

    def measure_then_step():
        seen.update(_footprint(engine))
        return step()

    engine.optimizer_step = measure_then_step
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        actor.update_policy(batch, mini_batch_rows=len(batch))
        times.append(time.perf_counter() - start)
    seen["optimizer_bytes"] = _footprint(engine)["optimizer_bytes"]  # AdamW state exists after the first step
    return {**seen, "step_s": statistics.median(times[1:]), "rows_per_rank": len(batch)}


def _rank_main(rank: int, port: int, steps: int, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = MTPCausalLM(ModelConfig(**MODEL))
    arr = load_config(["actor_rollout_ref.actor.optim.lr=1e-5", "actor_rollout_ref.model.mtp.num_layers=1",
                       "actor_rollout_ref.model.mtp.enable=true", "actor_rollout_ref.model.mtp.enable_train=true"]
                      ).actor_rollout_ref
    results = {name: _run_arm(name, model, arr, _batch(), steps) for name in ARMS}
    results["model_param_bytes"] = 4 * model.num_parameters()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(free_port(), args.steps, args.threads, tmp), nprocs=WORLD,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    total = ranks[0].pop("model_param_bytes")
    ranks[1].pop("model_param_bytes")
    mib = 2 ** 20
    print(f"model: {total / mib:.2f} MiB of fp32 parameters; world {WORLD} over gloo, {args.threads} thread(s) per rank")
    print(f"{'engine':<10}{'params MiB':>12}{'grads MiB':>11}{'AdamW MiB':>11}{'total MiB':>11}{'step s':>9}")
    report = {"model": MODEL, "model_param_bytes": total, "world": WORLD, "threads": args.threads,
              "steps": args.steps, "per_rank": {}}
    for name in ARMS:
        worst = {k: max(r[name][k] for r in ranks) for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "step_s")}
        both = worst["param_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"]
        report["per_rank"][name] = {**worst, "total_bytes": both, "ranks": [r[name] for r in ranks]}
        print(f"{name:<10}{worst['param_bytes'] / mib:>12.2f}{worst['grad_bytes'] / mib:>11.2f}"
              f"{worst['optimizer_bytes'] / mib:>11.2f}{both / mib:>11.2f}{worst['step_s']:>9.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"(per rank: the larger of the two ranks; written to {args.out})")


if __name__ == "__main__":
    main()
