"""bench/compile_step.py's static-shape step computes what the engine's step computes (eager here; the
compiled timings live in the script's output and docs/benchmarks.md)."""

import importlib.util
from pathlib import Path

import torch

from tests.conftest import toy_config
from verl_mtp.models import MTPCausalLM
from verl_mtp.rollout.fast_model import FastModel

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compile_step.py"


def test_static_step_equals_the_engines_step_and_returns_the_new_keys_and_values():
    spec = importlib.util.spec_from_file_location("compile_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config()).eval()
    fast = FastModel(model, torch.float32, 32)
    cache = fast.allocate_cache(4)
    slots, ctx = torch.tensor([2, 0, 3]), torch.tensor([5, 9, 7])  # ragged rows, not a contiguous block
    with torch.no_grad():
        for slot, n in zip(slots.tolist(), ctx.tolist()):
            fast.trunk_step(torch.randint(1, 24, (1, n)), torch.arange(n)[None], cache, torch.tensor([slot]))
        tok = torch.randint(1, 24, (3,))
        logits, new_k, new_v = bench.static_step(fast, cache.kv.clone(), tok, ctx, slots)
        ref = fast.lm_logits(fast.trunk_step(tok[:, None], ctx[:, None], cache, slots))[:, 0]
    assert torch.allclose(logits, ref, atol=1e-5)
    layers = len(fast.blocks)
    written = cache.kv[:, :layers, slots, :, ctx]  # (rows, 2, layers, Hkv, D): what the engine's step wrote
    assert torch.allclose(new_k, written[:, 0], atol=1e-6) and torch.allclose(new_v, written[:, 1], atol=1e-6)
