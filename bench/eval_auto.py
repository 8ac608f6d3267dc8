"""The quickstart eval's speed passes (trainer/evaluate.py: greedy, batch 64, held-out prompts) for one model:
plain vs `auto` (and fixed depths) side by side, so adaptive depth can be judged against plain decoding.

    python bench/eval_auto.py [--model runs/quickstart/sft] [--tokenizer runs/quickstart/tokenizer]
        [--test runs/quickstart/data/test.parquet] [--limit 512] [--repeats 3] [--depths 0,2,auto] [--cold]

Each repeat runs the passes side by side a round at a time, on new engines each, as the eval does
(`evaluate.side_by_side`): each engine first generates over the held-out set's first prompts
(`evaluate.warmed_engines`), so auto is timed as on every rollout of an RL run but the first; with
--cold the engines start cold and auto's one-off probe (the MTP layer catching up on every live prompt,
a few rounds at depth 1) is in the timing. Side by side cancels the box's drift, not everything: two plain
engines stepped in turn differ by 1-3.5 % per pass in CPU time alone (where each engine's buffers lie in
memory), so a ratio needs the median over repeats, each on freshly allocated engines. Prints tokens/s per
pass (median over repeats), each pass / plain per repeat and their median, and auto's rounds per depth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/quickstart/sft")
    ap.add_argument("--tokenizer", default="runs/quickstart/tokenizer")
    ap.add_argument("--test", default="runs/quickstart/data/test.parquet")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depths", default="0,2,auto", help="passes, comma-separated: ints and/or 'auto'")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cold", action="store_true", help="no warm-up generation: auto's first-rollout probe is timed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from verl_mtp.models import MTPCausalLM
    from verl_mtp.rollout import SamplingParams
    from verl_mtp.trainer.evaluate import WARMUP_PROMPTS, held_out, side_by_side, warmed_engines

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = MTPCausalLM.from_pretrained(args.model)
    _, prompts = held_out(tok, args.test, args.limit)
    passes = [int(d) if d != "auto" else d for d in args.depths.split(",")]
    params = SamplingParams(temperature=0, max_new_tokens=64, stop_token_ids=[tok.eos_token_id])
    load = [os.getloadavg()[0]]
    rates: dict = {p: [] for p in passes}
    hists: list = []
    for _ in range(args.repeats):
        engines = warmed_engines(model, tok, prompts, {p: p for p in passes}, params, 0 if args.cold else WARMUP_PROMPTS)
        timed = side_by_side(engines, prompts, params)
        for p, (out, _, rate) in timed.items():
            rates[p].append(rate)
            if p == "auto":
                hists.append(dict(sorted(out.depth_histogram.items())))
    load.append(os.getloadavg()[0])
    med = {p: statistics.median(r) for p, r in rates.items()}
    result = {"tokens_per_s": {str(p): [round(x) for x in r] for p, r in rates.items()},
              "median": {str(p): round(m) for p, m in med.items()},
              "auto_depths": hists, "load_1min": load, "threads": torch.get_num_threads(), "cold": args.cold}
    if 0 in med:  # paired: each repeat's passes ran side by side
        result["vs_plain_per_repeat"] = {str(p): [round(a / b, 3) for a, b in zip(r, rates[0])] for p, r in rates.items()}
        result["vs_plain"] = {str(p): round(statistics.median(a / b for a, b in zip(r, rates[0])), 3)
                              for p, r in rates.items()}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
