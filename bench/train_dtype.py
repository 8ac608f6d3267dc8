"""The RL step's training phases (old log-probs + PPO update with the MTP loss) on the torch engine, fp32 vs
bf16 compute (actor_rollout_ref.actor.fsdp_config.dtype), same weights and batch.
    python bench/train_dtype.py [--hidden 128 --layers 4 --mtp 1 --rows 64 --prompt 40 --response 64 --reps 5]

The defaults are bench/rl_step.py's model and batch (8 prompts x 8 samples, up to 64 new tokens). The
old log-probs of the update come from the fp32 pass (a fp32 rollout), so ppo_kl on the first update is
the fp32-vs-bf16 log-prob mismatch. Hold /tmp/heavy.lock on a shared machine."""

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from verl_mtp.batch import from_samples
from verl_mtp.config import load_config
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM, ModelConfig

ap = argparse.ArgumentParser()
for k, v in dict(hidden=128, layers=4, mtp=1, rows=64, prompt=40, response=64, reps=5, threads=2, vocab=512).items():
    ap.add_argument(f"--{k}", type=int, default=v)
a = ap.parse_args()
torch.set_num_threads(a.threads)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(1, a.vocab, (a.prompt,), generator=g).tolist() for _ in range(a.rows)]
responses = [torch.randint(1, a.vocab, (int(torch.randint(a.response // 2, a.response + 1, (1,), generator=g)),),
                           generator=g).tolist() for _ in range(a.rows)]
batch = from_samples(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0,
                     meta={"uid": [i // 8 for i in range(a.rows)]})
batch = batch.with_(advantages=torch.randn(batch.responses.shape, generator=g) * batch.response_mask)
arr = load_config(["actor_rollout_ref.actor.optim.lr=1e-5", f"actor_rollout_ref.model.mtp.num_layers={a.mtp}",
                   f"actor_rollout_ref.actor.ppo_mini_batch_size={a.rows // 8}", "actor_rollout_ref.rollout.n=8",
                   f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={a.rows}"]).actor_rollout_ref
cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                  num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                  num_nextn_predict_layers=a.mtp, tie_word_embeddings=True)
results, logprobs = {}, {}
for dtype in ("float32", "bfloat16"):
    torch.manual_seed(0)
    model = MTPCausalLM(cfg)
    fsdp = {**OmegaConf.to_container(arr.actor.fsdp_config), "dtype": dtype}
    engine = build_engine("torch", model=model, optim=OmegaConf.to_container(arr.actor.optim), total_steps=100,
                          num_mtp=a.mtp, fsdp=fsdp)
    actor = PolicyActor(engine, arr, temperature=1.0)
    lp_times, up_times = [], []
    for rep in range(a.reps + 1):
        t0 = time.perf_counter()
        lp, _ = actor.compute_log_probs(batch, micro_size=a.rows)
        t1 = time.perf_counter()
        if rep == 0:
            logprobs[dtype] = lp
            old = logprobs["float32"]  # the fp32 rollout's log-probs, as a fp32 rollout would return them
        m = actor.update_policy(batch.with_(old_log_probs=old), a.rows)
        t2 = time.perf_counter()
        if rep == 0:
            first = m
        else:
            lp_times.append(t1 - t0)
            up_times.append(t2 - t1)
    results[dtype] = (statistics.median(lp_times), statistics.median(up_times), first)
mask = batch.response_mask.bool()
diff = (logprobs["bfloat16"] - logprobs["float32"])[mask]
print(f"model hidden {a.hidden} layers {a.layers} K={a.mtp}, batch {a.rows} x ({a.prompt} prompt + <= {a.response} "
      f"response), {a.threads} threads, median of {a.reps}")
print("| compute | old log-prob s | update s | phases s | ppo_kl vs fp32 old | mtp/loss |")
print("|---|---|---|---|---|---|")
for dtype, (lp, up, m) in results.items():
    print(f"| {dtype} | {lp:.3f} | {up:.3f} | {lp + up:.3f} | {m['actor/ppo_kl']:.2e} | {m['mtp/loss']:.4f} |")
print(f"bf16 vs fp32 log-probs of the same weights: mean |diff| {diff.abs().mean():.4f}, max {diff.abs().max():.4f}")
fp32, bf16 = (sum(results[d][:2]) for d in ("float32", "bfloat16"))
print(f"speed-up bf16/fp32 of the training phases: {fp32 / bf16:.2f}x")
