"""Rollout tokens/s on a real pretrained model: transformers `generate` against the native engine, plain,
at MTP depth K and adaptive ("auto"), at batch 1 / 8 / 64, on the chat-templated prompts of a verl parquet.

    python bench/real_model.py --model runs/smollm2_cpu/rl/ckpt/global_step_10/actor \\
        --hf-model runs/smollm2_cpu/base --test runs/smollm2_cpu/data/test.parquet [--threads 1] [--repeats 2]

--model is a folder with trained MTP layers (our engine's arms); --hf-model the plain HF folder of the same
trunk for transformers (default: --model). Decoding is greedy with no stop token, so every arm generates
exactly --max-new-tokens per prompt; each arm's tokens are compared with our plain decoding's (greedy
speculation is exact). Arms are warmed up once and timed round-robin (bench/rollout.py's `time_arms`);
the median is reported. Writes JSON to --out (bench/results/real_model.json) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import transformers  # noqa: E402

from rollout import HFArm, NativeArm, time_arms  # noqa: E402  (bench/, the script's own folder)
from verl_mtp.models import MTPCausalLM  # noqa: E402
from verl_mtp.trainer.evaluate import held_out  # noqa: E402
from verl_mtp.trainer.setup import load_tokenizer  # noqa: E402


def bench(model_dir: str, hf_dir: str, test: str, batches: list[int], new_tokens: int, repeats: int) -> dict:
    tok = load_tokenizer(model_dir)
    model = MTPCausalLM.from_pretrained(model_dir).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    _, prompts = held_out(tok, test, max(batches))
    k = model.num_mtp_layers
    rows = []
    for b in batches:
        batch_prompts = prompts[:b]
        longest = max(map(len, batch_prompts))
        arms = {"transformers": HFArm(hf, new_tokens), "plain": NativeArm(model, 0, b, new_tokens, longest),
                f"speculative_{k}": NativeArm(model, k, b, new_tokens, longest),
                "auto": NativeArm(model, "auto", b, new_tokens, longest)}
        timings = time_arms(arms, batch_prompts, repeats)
        reference = timings["plain"].tokens
        for name, t in timings.items():
            same = sum(a == r for a, r in zip(t.tokens, reference)) / len(reference)
            rows.append({"batch": b, "arm": name, "tokens_per_s": round(b * new_tokens / t.median, 1),
                         "seconds": [round(s, 3) for s in t.seconds], "accept_length": round(t.accept_length, 3),
                         "same_tokens_as_plain": round(same, 3)})
            print(f"batch {b:3d}  {name:14s} {rows[-1]['tokens_per_s']:8.1f} tok/s  accept {t.accept_length:.2f}  "
                  f"same as plain {same:.0%}", flush=True)
    return {"rows": rows, "model": model_dir, "hf_model": hf_dir, "num_mtp_layers": k, "max_new_tokens": new_tokens,
            "repeats": repeats, "prompt_tokens": [len(p) for p in prompts[:max(batches)]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="folder with trained MTP layers")
    ap.add_argument("--hf-model", help="the plain HF folder for transformers' generate (default: --model)")
    ap.add_argument("--test", required=True, help="verl parquet whose chat prompts are decoded")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "real_model.json"))
    args = ap.parse_args(argv)
    for flag, folder in (("--model", args.model), ("--hf-model", args.hf_model or args.model)):
        if not (Path(folder) / "config.json").is_file():
            ap.error(f"{flag} {folder}: no config.json")
    if not Path(args.test).is_file():
        ap.error(f"--test {args.test}: no such file")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    load = os.getloadavg()[0]
    result = bench(args.model, args.hf_model or args.model, args.test, args.batches, args.max_new_tokens,
                   args.repeats)
    result.update(torch_threads=args.threads, loadavg_1min=[round(load, 2), round(os.getloadavg()[0], 2)],
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores", torch=torch.__version__,
                  transformers=transformers.__version__)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
