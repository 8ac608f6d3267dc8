"""CPU smoke run of the model and engine: `verl-mtp smoke [--steps 200] [--depth 2]`.

Builds a tiny MTP model, trains trunk and MTP layers for a few seconds on a toy Markov chain, saves it
as an HF/MiMo folder, loads it back and generates with and without MTP speculation."""

from __future__ import annotations

import argparse
import tempfile

import torch

from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.models.toy import fit_markov
from verl_mtp.rollout import NativeEngine, SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="verl-mtp smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps on the toy chain")
    ap.add_argument("--depth", type=int, default=2, help="speculative draft depth")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, num_nextn_predict_layers=2)
    model, _ = fit_markov(MTPCausalLM(cfg), steps=args.steps, seed=args.seed)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        model = MTPCausalLM.from_pretrained(folder)
    print(f"model: {model.num_parameters():,} parameters, K={model.num_mtp_layers} MTP layers")
    engine = NativeEngine(model, max_batch_size=8, max_seq_len=256)
    prompts = [[i, (i * 7) % 64] for i in range(8)]
    params = SamplingParams(temperature=0, max_new_tokens=128)
    plain = engine.generate(prompts, params, speculative=0)
    spec = engine.generate(prompts, params, speculative=args.depth)
    same = all(a.token_ids == b.token_ids for a, b in zip(plain.samples, spec.samples))
    print(f"plain:       {plain.tokens_per_s:8.0f} tok/s")
    print(f"speculative: {spec.tokens_per_s:8.0f} tok/s  accept length {spec.stats.accept_length:.2f}  "
          f"greedy output identical: {same}")
    return 0 if same else 1
