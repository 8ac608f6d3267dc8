"""The policy's roles on top of any TrainingEngine: log-probs, and the PPO update with the MTP loss.

Backend-agnostic by construction: it only builds micro-batches and loss closures and hands them to
the engine, so the torch and megatron backends share every line of the algorithm."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from verl_mtp.algos import (agg_loss, compute_mtp_loss, entropy_from_logits, get_policy_loss, kl_penalty,
                            logprobs_from_logits, masked_mean, partition_by_token_budget,
                            split_into_micro_batches)
from verl_mtp.batch import Batch
from verl_mtp.engines.base import TrainingEngine
from verl_mtp.models.moe import moe_metrics


def response_logits(logits: torch.Tensor, micro: Batch, temperature: float) -> torch.Tensor:
    """(B, P+R, V) -> (B, R, V): the logits that predict each response token, temperature-scaled."""
    p, r = micro.prompts.shape[1], micro.responses.shape[1]
    return logits[:, p - 1: p + r - 1] / temperature


class PolicyActor:
    """cfg: the `actor_rollout_ref` config (DictConfig or nested dict)."""

    def __init__(self, engine: TrainingEngine, cfg, temperature: float = 1.0):
        self.engine = engine
        self.actor = cfg.actor
        self.mtp = cfg.model.mtp
        self.temperature = temperature
        self.policy_loss = get_policy_loss(self.actor.policy_loss.loss_mode)

    # ---- micro-batching ------------------------------------------------------------------

    def _micro_batches(self, batch: Batch, micro_size: int | None, dynamic: bool, max_tokens: int) -> list[Batch]:
        if dynamic:
            groups = partition_by_token_budget(batch.seq_lengths(), max_tokens)
        else:
            groups = split_into_micro_batches(len(batch), micro_size or len(batch))
        return [batch.select(g) for g in groups]

    # ---- log-probs -----------------------------------------------------------------------

    def compute_log_probs(self, batch: Batch, micro_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) log-probs and entropies of the responses under the current weights."""
        def fn(out, micro):
            logits = response_logits(out.logits, micro, self.temperature)
            return logprobs_from_logits(logits, micro.responses), entropy_from_logits(logits)

        micros = self._micro_batches(batch, micro_size, self.actor.use_dynamic_bsz, self.actor.ppo_max_token_len_per_gpu)
        results = self.engine.infer(micros, fn)
        r = batch.responses.shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (0, r - t.shape[1]))  # noqa: E731
        return torch.cat([pad(lp) for lp, _ in results]), torch.cat([pad(e) for _, e in results])

    # ---- PPO update ----------------------------------------------------------------------

    def _loss_fn(self, tokens: float, seqs: float):
        a = self.actor

        def loss_fn(out, micro: Batch):
            logits = response_logits(out.logits, micro, self.temperature)
            log_prob = logprobs_from_logits(logits, micro.responses)
            mask = micro.response_mask
            pg = self.policy_loss(micro.old_log_probs, log_prob, micro.advantages, mask, a.clip_ratio_low,
                                  a.clip_ratio_high, a.clip_ratio_c, a.loss_agg_mode, tokens, seqs)
            loss = pg["pg_loss"]
            metrics = {f"actor/{k}": float(v.detach()) for k, v in pg.items()}
            entropy = entropy_from_logits(logits) if a.entropy_coeff else entropy_from_logits(logits.detach())
            if a.entropy_coeff:
                loss = loss - a.entropy_coeff * agg_loss(entropy, mask, a.loss_agg_mode, tokens, seqs)
            metrics["actor/entropy"] = float(masked_mean(entropy.detach(), mask))
            if a.use_kl_loss:
                kl = agg_loss(kl_penalty(log_prob, micro.ref_log_probs, a.kl_loss_type), mask, a.loss_agg_mode,
                              tokens, seqs)
                loss = loss + a.kl_loss_coef * kl
                metrics["actor/kl_loss"] = float(kl.detach())
            if out.mtp_logits:
                full_mask = torch.cat([torch.zeros_like(micro.prompt_mask), mask], dim=1)
                mtp_loss, mtp_metrics = compute_mtp_loss(out.mtp_logits, micro.input_ids, full_mask,
                                                         self.mtp.mtp_loss_scaling_factor, token_count=tokens,
                                                         attention_mask=micro.attention_mask)
                loss = loss + mtp_loss
                metrics.update(mtp_metrics)
                metrics["mtp/loss"] = float(mtp_loss.detach())
            if out.moe_stats is not None:  # MoE: the load-balancing loss, weighted by this micro-batch's tokens
                loss = loss + out.aux_loss * (float(mask.sum()) / tokens)
                metrics.update(moe_metrics(out.aux_loss, out.moe_stats))
            return loss, metrics

        return loss_fn

    def update_policy(self, batch: Batch, mini_batch_rows: int) -> dict[str, float]:
        """PPO epochs over mini-batches of `mini_batch_rows` rows; one optimizer step per mini-batch."""
        a = self.actor
        per_micro, per_mini = defaultdict(list), defaultdict(list)
        grad_norms, nan_steps = [], 0
        g = torch.Generator().manual_seed(len(batch))  # deterministic, so a resumed run replays it
        for _ in range(a.ppo_epochs):
            order = torch.randperm(len(batch), generator=g) if a.shuffle else torch.arange(len(batch))
            for start in range(0, len(batch), mini_batch_rows):
                mini = batch.select(order[start: start + mini_batch_rows])
                tokens = float(mini.response_mask.sum())
                micros = self._micro_batches(mini, a.ppo_micro_batch_size_per_gpu, a.use_dynamic_bsz,
                                             a.ppo_max_token_len_per_gpu)
                # each micro-batch divides by the mini-batch's token count, so their losses add up to it
                sums = defaultdict(float)
                for m in self.engine.forward_backward(micros, self._loss_fn(tokens, float(len(mini)))):
                    for k, v in m.items():
                        if k in _ADDITIVE:
                            sums[k] += v
                        else:
                            per_micro[k].append(v)
                for k, v in sums.items():
                    per_mini[k].append(v)
                norm = self.engine.optimizer_step()
                if math.isfinite(norm):
                    grad_norms.append(norm)
                else:
                    nan_steps += 1
        metrics = {k: sum(v) / len(v) for k, v in {**per_micro, **per_mini}.items()}
        if grad_norms:
            metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["actor/lr"] = self.engine.lr
        metrics["actor/nan_skipped_updates"] = float(nan_steps)
        return metrics


# metrics that are a micro-batch's share of the mini-batch value (summed), the rest are averaged
_ADDITIVE = {"actor/pg_loss", "actor/kl_loss", "mtp/loss"}
