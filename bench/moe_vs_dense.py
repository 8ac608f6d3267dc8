"""Dense FFN vs DeepSeek-style MoE at equal active parameters, on the quickstart's SFT task (CPU).

    python bench/moe_vs_dense.py [--steps 600] [--threads 1] [--out bench/results/moe_vs_dense.json]

Both models are the quickstart SFT model (hidden 128, 4 layers, 4 heads / 2 KV heads, K=2 MTP layers,
tied embeddings) and differ only in the FFN:
  dense  every block (trunk and MTP) a SwiGLU of intermediate 384
  moe    layer 0 dense as above (first_k_dense_replace=1); layers 1-3 and both MTP layers an MoE of
         8 routed experts, top-2, + 1 shared expert, each a SwiGLU of 128: a token runs 2*128 + 128 =
         384 intermediate units, as in the dense FFN (the router adds 8*128 weights per layer);
         aux loss coefficient 0.01 per MoE layer
They see the same batches in the same order (seed), with the quickstart SFT objective (response tokens,
MTP loss x 0.3, AdamW 3e-3 with warmup and cosine decay) plus, for the MoE, its load-balancing loss.
Reported per model: parameters (total, and active per token), training tokens/s (real tokens, not
padding), validation LM loss and MTP-1 accuracy on 256 held-out SFT rows, greedy accuracy on the
held-out test questions (native engine, speculative depth 2, so also its accept length and tokens/s),
and for the MoE the expert loads on the validation rows: `balance` = max/mean expert load per layer, averaged over
layers (1.0 = perfectly even, 4.0 = every token on the same 2 of 8 experts), and the min/max load
fraction of any expert in any layer (even = 1/8 = 0.125).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from verl_mtp.algos.mtp_loss import compute_mtp_loss
from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.trainer import sft

MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             num_nextn_predict_layers=2, tie_word_embeddings=True, max_position_embeddings=1024)
VARIANTS = {
    "dense": {},
    "moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
                first_k_dense_replace=1, moe_in_mtp=True, router_aux_loss_coef=0.01),
}


def prepare_data(work: Path, n_sft: int, n_test: int, seed: int):
    """The quickstart's synthetic math SFT corpus + held-out test questions, and its tokenizer."""
    from verl_mtp.data.synthetic_math import iter_corpus_text, write_rl_dataset
    from verl_mtp.data.tokenizer import train_tokenizer
    from verl_mtp.trainer.setup import load_tokenizer

    paths = write_rl_dataset(str(work / "data"), n_train=16, n_test=n_test, seed=seed, n_sft=n_sft)
    train_tokenizer(iter_corpus_text(20000, seed=0), str(work / "tokenizer"))
    return paths, load_tokenizer(str(work / "tokenizer"))


def build_model(variant: str, tokenizer, seed: int) -> MTPCausalLM:
    cfg = ModelConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      **MODEL, **VARIANTS[variant])
    torch.manual_seed(seed)
    return MTPCausalLM(cfg)


def step_loss(model: MTPCausalLM, batch, cfg: sft.SFTConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT objective (LM + scaled MTP loss, per response token) plus the MoE load-balancing loss."""
    ids, attention, loss_mask = batch
    out = model(ids, attention)
    targets = loss_mask[:, 1:].float()
    tokens = float(targets.sum())
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    lm = (ce * targets.flatten()).sum() / tokens
    mtp, _ = compute_mtp_loss(out.mtp_logits, ids, loss_mask, cfg.mtp_scale, tokens)
    return lm + mtp + out.aux_loss, {"lm": float(lm.detach()), "aux": float(out.aux_loss.detach())}


def train(model: MTPCausalLM, rows: list[sft.Example], pad_id: int, cfg: sft.SFTConfig) -> dict[str, float]:
    opt, sched = sft.build_optimizer(model, cfg)
    stream = sft.BatchStream(rows, cfg.batch_size, cfg.seed)
    model.train()
    tokens, seconds = 0, 0.0
    for step in range(1, cfg.steps + 1):
        batch = sft.collate([rows[i] for i in stream.next()], pad_id)
        started = time.perf_counter()
        loss, parts = step_loss(model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - started
        tokens += int(batch[1].sum())
        if step % 50 == 0 or step == cfg.steps:
            print(f"  step {step}: lm {parts['lm']:.3f} aux {parts['aux']:.4f}  {tokens / seconds:.0f} tok/s",
                  flush=True)
    return {"train_seconds": seconds, "train_tokens_per_s": tokens / seconds}


@torch.no_grad()
def expert_loads(model: MTPCausalLM, batches) -> dict[str, float]:
    """Loads of every MoE layer over the validation rows (each batch weighted by its real tokens)."""
    if not model.config.is_moe:
        return {}
    model.eval()
    total, weight = 0.0, 0.0
    for ids, attention, _ in batches:
        n = float(attention.sum())
        total, weight = total + model(ids, attention).moe_stats * n, weight + n
    loads = total / weight  # (L, E)
    balance = (loads.max(-1).values / loads.mean(-1)).mean()
    return {"balance": float(balance), "min_expert_load": float(loads.min()), "max_expert_load": float(loads.max())}


def run_variant(variant: str, data, tokenizer, cfg: sft.SFTConfig, eval_limit: int) -> dict[str, float]:
    paths, train_rows, val_batches = data
    model = build_model(variant, tokenizer, cfg.seed)
    print(f"{variant}: {model.num_parameters():,} parameters, {model.num_parameters(active=True):,} active", flush=True)
    result = {"params_total": model.num_parameters(), "params_active": model.num_parameters(active=True)}
    result.update(train(model, train_rows, tokenizer.pad_token_id, cfg))
    val = sft.validation_loss(model, val_batches, cfg)
    result.update(val_loss=val["val/loss"], val_mtp_acc_1=val.get("val/mtp/acc_1", float("nan")))
    test = sft.evaluate_accuracy(model, tokenizer, paths["test"], limit=eval_limit)
    result.update(test_acc=test["acc"], accept_length=test["accept_length"], rollout_tokens_per_s=test["tokens_per_s"])
    result.update(expert_loads(model, val_batches))
    return result


def table(results: dict[str, dict[str, float]]) -> str:
    cols = [("params_total", "params", "{:,.0f}"), ("params_active", "active", "{:,.0f}"),
            ("train_tokens_per_s", "train tok/s", "{:,.0f}"), ("train_seconds", "train s", "{:.0f}"),
            ("val_loss", "val loss", "{:.4f}"), ("val_mtp_acc_1", "val MTP-1 acc", "{:.3f}"),
            ("test_acc", "test acc", "{:.3f}"), ("accept_length", "accept len", "{:.2f}"),
            ("rollout_tokens_per_s", "rollout tok/s", "{:,.0f}"),
            ("balance", "balance", "{:.3f}"), ("min_expert_load", "min load", "{:.3f}"),
            ("max_expert_load", "max load", "{:.3f}")]
    lines = ["| model | " + " | ".join(title for _, title, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = [fmt.format(r[key]) if key in r else "-" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per model (batch 32; the quickstart SFT)")
    ap.add_argument("--n-sft", type=int, default=20000, help="SFT corpus rows (the quickstart's)")
    ap.add_argument("--n-test", type=int, default=256, help="held-out test questions for the greedy accuracy")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 on a busy 2-core box oversubscribes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/moe_vs_dense.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = sft.SFTConfig(steps=args.steps, warmup=min(30, args.steps // 10), seed=args.seed)
    with tempfile.TemporaryDirectory() as work:
        paths, tokenizer = prepare_data(Path(work), args.n_sft, args.n_test, args.seed)
        examples, _ = sft.load_corpus(paths["sft"], tokenizer, cfg.loss_on, cfg.max_len)
        train_rows, val_rows = sft.split_validation(examples, cfg.val_size, cfg.seed)
        val_batches = [sft.collate([val_rows[i] for i in b], tokenizer.pad_token_id) for b in
                       sft.length_bucketed_batches([len(e.ids) for e in val_rows], 64, random.Random(0))]
        data = (paths, train_rows, val_batches)
        results = {name: run_variant(name, data, tokenizer, cfg, args.n_test) for name in VARIANTS}
    print(table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"steps": args.steps, "batch_size": cfg.batch_size, "threads": args.threads, "seed": args.seed,
            "model": MODEL, "variants": VARIANTS, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"config": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
