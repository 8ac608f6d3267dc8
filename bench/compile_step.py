"""A static-shape plain decode step under `torch.compile` against the engine's eager step (issue #23's
prototype measurement; the engine does not use it yet).

    python bench/compile_step.py [--model rl|bench] [--threads 1] [--context 40] [--out bench/results/compile_step.json]

The static step takes every shape from the batch size alone: the new token's query attends over the whole
cached row (keys at positions < pos, masked) plus its own key, which the step returns instead of writing it,
so the compiled graph mutates no input (a first prototype that wrote the KV cache in place inside the
graph ran 40-60 ms per step against 1-7 ms eager: inductor copied the cache). Arms, per batch size, on
one random-init model and one KV cache filled with a `--context`-token prompt:
  today      FastModel.trunk_step + lm_logits on a (B, 1) chunk: what the engine's plain round runs;
  static     the static step, eager;
  compiled   the static step, `torch.compile(dynamic=False, fullgraph=True)` (compile seconds reported).
Each arm's logits are checked against today's; times are the best of 7 runs of 20 steps, the arms
interleaved. The cache write and sampling, which the engine adds to every arm alike, are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from verl_mtp.models import MTPCausalLM, ModelConfig  # noqa: E402
from verl_mtp.rollout.fast_model import FastModel  # noqa: E402

MODELS = {  # rl: bench/rl_step.py's policy; bench: bench/rollout.py's
    "rl": dict(vocab_size=390, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, num_nextn_predict_layers=1),
    "bench": dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, num_nextn_predict_layers=2),
}


def static_step(fast: FastModel, kv_all, tokens, pos, slots):
    """(B,) tokens at positions (B,) of cache rows (B,) -> (float32 logits (B, V), new keys and values
    (B, layers, Hkv, D) each). Reads the cache only."""
    b = tokens.shape[0]
    h, hkv, d = fast.num_heads, fast.num_kv_heads, fast.head_dim
    g, scale = h // hkv, 1.0 / math.sqrt(d)
    length = kv_all.shape[-2]
    bias = torch.where(torch.arange(length, device=tokens.device)[None, :] < pos[:, None], 0.0, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, L): cached keys before pos
    cos, sin = fast.cos[pos][:, None], fast.sin[pos][:, None]  # (B, 1, D)
    x = F.embedding(tokens, fast.embed)
    new_k, new_v = [], []
    for i, blk in enumerate(fast.blocks):
        qkv = F.linear(fast._norm(x, blk.ln1), blk.w_qkv, blk.b_qkv).view(b, h + 2 * hkv, d)
        qk = qkv[:, : h + hkv]
        qk = qk * cos + qk[..., fast.perm] * sin
        k_new, v_new = qk[:, h:], qkv[:, h + hkv:]
        new_k.append(k_new)
        new_v.append(v_new)
        k, v = kv_all[0, i, slots], kv_all[1, i, slots]  # (B, Hkv, L, D)
        q = qk[:, :h].view(b, hkv, g, d)
        scores = torch.cat([torch.matmul(q, k.transpose(-1, -2)) * scale + bias,
                            (q * k_new[:, :, None]).sum(-1, keepdim=True) * scale], dim=-1).softmax(-1)
        out = torch.matmul(scores[..., :-1], v) + scores[..., -1:] * v_new[:, :, None]
        x = x + F.linear(out.reshape(b, h * d), blk.w_o, blk.b_o)
        gate, up = F.linear(fast._norm(x, blk.ln2), blk.w_gu, blk.b_gu).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, blk.w_down, blk.b_down)
    return fast.lm_logits(fast._norm(x, fast.norm)), torch.stack(new_k, 1), torch.stack(new_v, 1)


def best_ms(fn, runs: int = 7, steps: int = 20) -> float:
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="rl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=40, help="cached tokens per row before the timed step")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--out", default="bench/results/compile_step.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MTPCausalLM(ModelConfig(**MODELS[args.model])).eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    fast = FastModel(model, torch.float32, 4 * args.context)
    cache = fast.allocate_cache(max(batches))
    compiled = torch.compile(static_step, dynamic=False, fullgraph=True)
    rows = []
    with torch.no_grad():
        for b in batches:
            slots = torch.arange(b)
            prompt = torch.randint(0, model.config.vocab_size, (b, args.context))
            fast.trunk_step(prompt, torch.arange(args.context).expand(b, -1), cache, slots)
            tok, pos = torch.randint(0, model.config.vocab_size, (b,)), torch.full((b,), args.context)
            today = lambda: fast.lm_logits(fast.trunk_step(tok[:, None], pos[:, None], cache, slots))[:, 0]  # noqa: E731
            ref = today()
            start = time.perf_counter()
            logits = compiled(fast, cache.kv, tok, pos, slots)[0]
            compile_s = time.perf_counter() - start
            err = {"static": float((static_step(fast, cache.kv, tok, pos, slots)[0] - ref).abs().max()),
                   "compiled": float((logits - ref).abs().max())}
            arms = {"today": today, "static": lambda: static_step(fast, cache.kv, tok, pos, slots),
                    "compiled": lambda: compiled(fast, cache.kv, tok, pos, slots)}
            ms = {name: [] for name in arms}
            for _ in range(3):  # interleaved, best of all
                for name, fn in arms.items():
                    ms[name].append(best_ms(fn))
            row = {"batch": b, "compile_s": round(compile_s, 1), **{f"{k}_ms": round(min(v), 3) for k, v in ms.items()},
                   "max_abs_logit_diff": err}
            row["compiled_vs_today"] = round(row["today_ms"] / row["compiled_ms"], 2)
            rows.append(row)
    print(f"model {args.model}, {args.threads} thread(s), context {args.context}; ms per plain decode step (model only)")
    print("| batch | today | static, eager | static, compiled | compiled speed-up | compile s | max logit diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['today_ms']:.3f} | {r['static_ms']:.3f} | {r['compiled_ms']:.3f} | "
              f"{r['compiled_vs_today']:.2f}x | {r['compile_s']} | {max(r['max_abs_logit_diff'].values()):.1e} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
