"""The policy's roles on top of any TrainingEngine: log-probs, and the PPO update with the MTP loss.

Backend-agnostic by construction: it only builds micro-batches and `MicroBatchFn`s and hands them to
the engine, so the torch and megatron backends share every line of the algorithm. Each function is
two-staged (see `MicroBatchFn`): per sequence position, the log-prob and entropy of the token it
predicts and each MTP depth's loss and expected acceptance; then the losses from those per-token values.
A backend that splits sequences over ranks (context parallel) runs the first stage on its own positions.
A log-prob pass runs the trunk only (no MTP layers) and computes entropies only when asked."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from verl_mtp.algos import (LossAggregation, entropy_from_logits, epoch_orders, get_policy_loss, kl_penalty,
                            logprobs_from_logits, masked_mean, partition_by_token_budget, split_into_micro_batches)
from verl_mtp.algos.mtp_loss import Warp, mtp_targets, mtp_token_losses, reduce_mtp_loss
from verl_mtp.algos.rollout_mismatch import rollout_mismatch_metrics
from verl_mtp.batch import Batch
from verl_mtp.engines.base import MicroBatchFn, TrainingEngine
from verl_mtp.models import MTPOutput
from verl_mtp.models.moe import moe_metrics


def token_targets(micro: Batch, mtp_depths: int) -> dict[str, torch.Tensor]:
    """Per sequence position t, (B, S) each: the token it predicts (`next`, t+1) and whether that is a
    response token (`scored`); per MTP depth i the token it predicts (t+i+2) and whether that counts in
    the MTP loss (a response token, predicted from a real one)."""
    ids = micro.input_ids
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, micro.prompts.shape[1] - 1: -1] = micro.response_mask.bool()
    targets = {"next": torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1), "scored": scored}
    mtp_ids, mtp_masks = mtp_targets(ids, _sequence_mask(micro), mtp_depths, micro.attention_mask)
    for i, (target, mask) in enumerate(zip(mtp_ids, mtp_masks)):
        targets[f"mtp_target_{i}"], targets[f"mtp_mask_{i}"] = target, mask
    return targets


def _sequence_mask(micro: Batch) -> torch.Tensor:
    """(B, S) 1 on response tokens."""
    return torch.cat([torch.zeros_like(micro.prompt_mask), micro.response_mask], dim=1)


def responses_of(values: torch.Tensor, micro: Batch) -> torch.Tensor:
    """(B, S) per-position values -> (B, R): those at the positions that predict the response tokens."""
    return values[:, micro.prompts.shape[1] - 1: -1]


def rollout_warp(rollout_cfg) -> Warp:
    """How the rollout warps the logits it samples from (`actor_rollout_ref.rollout`): what the MTP loss
    and the expected acceptance compare the draft with."""
    greedy = not rollout_cfg.do_sample or rollout_cfg.temperature == 0
    return Warp(0.0 if greedy else rollout_cfg.temperature, rollout_cfg.top_k, rollout_cfg.top_p)


class PolicyActor:
    """cfg: the `actor_rollout_ref` config (DictConfig or nested dict)."""

    def __init__(self, engine: TrainingEngine, cfg, temperature: float = 1.0, max_response_length: int | None = None,
                 seed: int = 0):
        self.engine = engine
        self.actor = cfg.actor
        self.mtp = cfg.model.mtp
        self.temperature = temperature
        self.policy_loss = get_policy_loss(self.actor.policy_loss.loss_mode)
        # Dr.GRPO's constant (seq-mean-token-sum-norm): verl's loss_scale_factor, by default the max
        # response length (verl pads every response to it); None: this batch's padded width
        self.horizon = self.actor.get("loss_scale_factor") or max_response_length
        self.seed = seed  # with the step, draws the mini-batch order when actor.shuffle
        self.warp = rollout_warp(cfg.rollout)
        # the draft chain of mtp/expected_accept_length: the rollout's fixed depth, or with "auto" the K depths
        # the training forward has (auto may go past K by reusing the last layer; those are not in the forward)
        steps = self.mtp.speculative_num_steps
        self.chain_depth = steps if isinstance(steps, int) else None
        # soft_ce, tv and the expected acceptance of depth i at t read the policy's logits at t+i+1, which
        # context parallel may hold on another rank: there only ce runs, without acceptance metrics
        self.policy_targets = getattr(engine, "cp", 1) == 1
        if not self.policy_targets and self.mtp.loss_type != "ce":
            raise ValueError(f"actor_rollout_ref.model.mtp.loss_type={self.mtp.loss_type} needs "
                             "context_parallel_size=1 (the target distribution may sit on another CP rank)")

    # ---- micro-batching ------------------------------------------------------------------

    def _row_groups(self, batch: Batch, micro_size: int | None, dynamic: bool, max_tokens: int) -> list[list[int]]:
        """The rows of each micro-batch; packed by token budget, they are not in the batch's order."""
        if dynamic:
            return partition_by_token_budget(batch.seq_lengths(), max_tokens)
        return split_into_micro_batches(len(batch), micro_size or len(batch))

    def _micro_batches(self, batch: Batch, micro_size: int | None, dynamic: bool, max_tokens: int) -> list[Batch]:
        return [batch.select(g) for g in self._row_groups(batch, micro_size, dynamic, max_tokens)]

    # ---- per-token values ----------------------------------------------------------------

    def _per_token(self, entropy: bool, entropy_grad: bool = False):
        def per_token(out: MTPOutput, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            keep = t["scored"]
            logits = out.logits[keep] / self.temperature  # (N, V): only positions that predict a response token
            zeros = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
            values = {"log_prob": zeros.masked_scatter(keep, logprobs_from_logits(logits, t["next"][keep]))}
            if entropy:
                values["entropy"] = zeros.masked_scatter(keep, entropy_from_logits(
                    logits if entropy_grad else logits.detach()))
            for i, mtp_logits in enumerate(out.mtp_logits):
                # the policy's distribution at t+i+1 is the target of depth i at t (see algos.mtp_loss)
                loss, values[f"mtp_hit_{i}"], accept = mtp_token_losses(
                    mtp_logits, t[f"mtp_target_{i}"], t[f"mtp_mask_{i}"], out.logits if self.policy_targets else None,
                    i, self.mtp.loss_type, self.warp)
                values[f"mtp_loss_{i}"] = loss
                if accept is not None:
                    values[f"mtp_accept_{i}"] = accept
            return values

        return per_token

    def _targets(self, micro: Batch) -> dict[str, torch.Tensor]:
        return token_targets(micro, self.engine.num_mtp_layers)

    # ---- log-probs -----------------------------------------------------------------------

    def compute_log_probs(self, batch: Batch, micro_size: int | None = None, entropy: bool = False,
                          dynamic: bool | None = None, max_tokens: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, R) log-probs of the responses under the current weights, and with `entropy` their entropies
        (else None). A trunk-only forward: the MTP layers and their vocabulary-wide heads do not run.
        `dynamic` / `max_tokens`: pack micro-batches by token budget (verl's log_prob_use_dynamic_bsz /
        log_prob_max_token_len_per_gpu); None = the actor's use_dynamic_bsz / ppo_max_token_len_per_gpu."""
        def reduce(values, out, micro):
            return responses_of(values["log_prob"], micro), (responses_of(values["entropy"], micro) if entropy
                                                             else None)

        dynamic = self.actor.use_dynamic_bsz if dynamic is None else dynamic
        groups = self._row_groups(batch, micro_size, dynamic, max_tokens or self.actor.ppo_max_token_len_per_gpu)
        results = self.engine.infer([batch.select(g) for g in groups],
                                    MicroBatchFn(self._per_token(entropy), reduce, self._targets, mtp=False))
        r = batch.responses.shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (0, r - t.shape[1]))  # noqa: E731
        rows = torch.argsort(torch.tensor([i for g in groups for i in g]))  # micro-batch order -> batch order
        log_probs = torch.cat([pad(lp) for lp, _ in results])[rows]
        return log_probs, (torch.cat([pad(e) for _, e in results])[rows] if entropy else None)

    # ---- PPO update ----------------------------------------------------------------------

    def _loss_fn(self, tokens: float, seqs: float) -> MicroBatchFn:
        a = self.actor

        def reduce(values, out: MTPOutput, micro: Batch):
            log_prob, entropy = responses_of(values["log_prob"], micro), responses_of(values["entropy"], micro)
            mask = micro.response_mask
            # no old log-probs: the batch is on-policy for this single step (see DAPOTrainer._old_log_prob_source)
            old = micro.old_log_probs if micro.old_log_probs is not None else log_prob.detach()
            aggregate = LossAggregation(a.loss_agg_mode, tokens, seqs, self.horizon)
            pg = self.policy_loss(old, log_prob, micro.advantages, mask, a, aggregate)
            loss = pg["pg_loss"]
            metrics = {f"actor/{k}": float(v.detach()) for k, v in pg.items()}
            if micro.rollout_log_probs is not None:  # the rollout's behaviour log-probs vs the actor's
                metrics.update(rollout_mismatch_metrics(micro.rollout_log_probs, old, mask))
            if a.entropy_coeff:
                loss = loss - a.entropy_coeff * aggregate(entropy, mask)
            metrics["actor/entropy"] = float(masked_mean(entropy.detach(), mask))
            if a.use_kl_loss:
                kl = aggregate(kl_penalty(log_prob, micro.ref_log_probs, a.kl_loss_type), mask)
                loss = loss + a.kl_loss_coef * kl
                metrics["actor/kl_loss"] = float(kl.detach())
            depths = sum(k.startswith("mtp_loss_") for k in values)
            if depths:
                masks = mtp_targets(micro.input_ids, _sequence_mask(micro), depths, micro.attention_mask)[1]
                per_depth = lambda name: [values[f"{name}_{i}"] for i in range(depths)]  # noqa: E731
                mtp_loss, mtp_metrics = reduce_mtp_loss(
                    per_depth("mtp_loss"), per_depth("mtp_hit"), masks, self.mtp.mtp_loss_scaling_factor,
                    token_count=tokens, accepts=per_depth("mtp_accept") if self.policy_targets else None,
                    chain_depth=self.chain_depth)
                loss = loss + mtp_loss
                metrics.update(mtp_metrics)
                metrics["mtp/loss"] = float(mtp_loss.detach())
            if out.moe_stats is not None:  # MoE: the load-balancing loss, weighted by this micro-batch's tokens
                loss = loss + out.aux_loss * (float(mask.sum()) / tokens)
                metrics.update(moe_metrics(out.aux_loss, out.moe_stats))
            return loss, metrics

        return MicroBatchFn(self._per_token(True, bool(a.entropy_coeff)), reduce, self._targets)

    def _loss_normalisers(self, mini: Batch) -> tuple[float, float]:
        """The response tokens and sequences of the mini-batch on all data-parallel ranks, divided by their
        number. The engines average gradients over those ranks, so each rank's loss sum / (global count /
        ranks) averages to the global token (or sequence) mean: the loss of one process over the whole
        mini-batch, however unevenly the long responses fell on the ranks (verl >= 0.5 does the same)."""
        # a row without response tokens is no sequence of the seq-mean-* modes (as in verl)
        counts = torch.tensor([float(mini.response_mask.sum()), float((mini.response_mask.sum(-1) > 0).sum())],
                              dtype=torch.float64)
        tokens, seqs = (self.engine.data_parallel_sum(counts) / self.engine.data_parallel_size).tolist()
        return tokens, seqs

    def update_policy(self, batch: Batch, mini_batch_rows: int, step: int = 0) -> dict[str, float]:
        """PPO epochs over mini-batches of `mini_batch_rows` rows; one optimizer step per mini-batch.
        `step` (the trainer's global step) and the seed draw the row order when actor.shuffle."""
        a = self.actor
        per_micro, per_mini = defaultdict(list), defaultdict(list)
        grad_norms, nan_steps = defaultdict(list), 0
        for order in epoch_orders(len(batch), a.ppo_epochs, a.shuffle, self.seed, step):
            for start in range(0, len(batch), mini_batch_rows):
                mini = batch.select(order[start: start + mini_batch_rows])
                tokens, seqs = self._loss_normalisers(mini)
                micros = self._micro_batches(mini, a.ppo_micro_batch_size_per_gpu, a.use_dynamic_bsz,
                                             a.ppo_max_token_len_per_gpu)
                # each micro-batch divides by the mini-batch's (global) count, so their losses add up to it
                sums = defaultdict(float)
                for m in self.engine.forward_backward(micros, self._loss_fn(tokens, seqs)):
                    for k, v in m.items():
                        if k in _ADDITIVE:
                            sums[k] += v
                        else:
                            per_micro[k].append(v)
                for k, v in sums.items():
                    per_mini[k].append(v)
                norms = self.engine.optimizer_step()
                if math.isfinite(norms["actor/grad_norm"]):
                    for k, v in norms.items():
                        grad_norms[k].append(v)
                else:
                    nan_steps += 1
        metrics = {k: sum(v) / len(v) for k, v in {**per_micro, **per_mini, **grad_norms}.items()}
        metrics["actor/lr"] = self.engine.lr
        metrics["actor/nan_skipped_updates"] = float(nan_steps)
        return metrics


# metrics that are a micro-batch's share of the mini-batch value (summed), the rest are averaged
_ADDITIVE = {"actor/pg_loss", "actor/kl_loss", "mtp/loss"}
