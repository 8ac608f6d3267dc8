"""The single-controller driver. One step, as in DESIGN.md's picture:

    prompts -> rollout (speculative, n per prompt) -> reward -> group filter (DAPO dynamic sampling)
            -> old (and ref) log-probs -> advantages -> PPO + MTP update -> weight sync (verified)
            -> metrics, checkpoint

The rollout, whatever its topology (colocated or split, in-process engine or HTTP servers), is one
`RolloutBackend` (workers/rollout_backends.py) chosen from the config; the driver never branches on it.
See docs/architecture.md for the layers and the types that travel.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numpy as np
import ray
import torch
from omegaconf import OmegaConf

from verl_mtp.algos import (DynamicSamplingState, accumulate_groups, build_kl_controller, filter_groups,
                            get_adv_estimator)
from verl_mtp.algos.kl import apply_kl_in_reward
from verl_mtp.batch import Batch, from_samples
from verl_mtp.data.rl_dataset import PromptLoader, RLDataset
from verl_mtp.observability.tracking import Tracker, pick_generations
from verl_mtp.rewards import RewardSample, check_data_sources
from verl_mtp.rollout.client import VERSION_CHECKED
from verl_mtp.rollout.replica import ReplicaUnreachable
from verl_mtp.trainer import checkpoint
from verl_mtp.trainer.setup import ensure_synthetic_task, load_tokenizer, resolve_device, tokenizer_path
from verl_mtp.workers.group import WorkerGroup, mean_metrics
from verl_mtp.workers.policy_worker import PolicyWorker
from verl_mtp.workers.reward_worker import RewardWorker
from verl_mtp.workers.rollout_backends import RolloutContext, rollout_backend


class WeightSyncError(RuntimeError):
    """The rollout does not hold the weights the actor sent."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


# a worker process that died or became unreachable; errors raised *inside* a worker are bugs and propagate
WORKER_DEATHS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ActorUnavailableError,
                 ReplicaUnreachable)


@contextmanager
def timer(name: str, timing: dict[str, float]):
    start = time.perf_counter()
    yield
    timing[f"timing_s/{name}"] = timing.get(f"timing_s/{name}", 0.0) + time.perf_counter() - start


def _stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    x = x.float()
    return {f"{prefix}/mean": float(x.mean()), f"{prefix}/max": float(x.max()), f"{prefix}/min": float(x.min())}


class DAPOTrainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = cfg.trainer.log_dir
        data = cfg.data
        train_files, val_files = data.train_files, data.val_files
        if train_files is None:
            train_files, synthetic_val = ensure_synthetic_task(cfg, self.run_dir)
            val_files = val_files or synthetic_val
        self.tokenizer_dir = tokenizer_path(cfg, self.run_dir)
        self.tokenizer = load_tokenizer(self.tokenizer_dir, cfg.actor_rollout_ref.model.trust_remote_code)
        dataset = lambda files, cap: RLDataset(files, self.tokenizer, prompt_key=data.prompt_key,  # noqa: E731
                                               max_prompt_length=data.max_prompt_length, truncation=data.truncation,
                                               filter_invalid=data.filter_invalid, max_samples=cap,
                                               shuffle=data.shuffle, seed=data.seed)
        self.train_set = dataset(train_files, data.train_max_samples)
        self.val_set = dataset(val_files, data.val_max_samples) if val_files else None
        if not cfg.custom_reward_function.path:  # fail now, not as a failed reward for every sample of the run
            check_data_sources((item["data_source"] for item in self.train_set.items), "data.train_files")
            check_data_sources((item["data_source"] for item in (self.val_set.items if self.val_set else ())),
                               "data.val_files")
        self.loader = PromptLoader(self.train_set, data.gen_batch_size or data.train_batch_size,
                                   shuffle=data.shuffle, seed=data.seed,
                                   key="data.gen_batch_size" if data.gen_batch_size else "data.train_batch_size")
        steps_per_epoch = max(len(self.train_set) // data.train_batch_size, 1)
        self.total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * steps_per_epoch
        alg = cfg.algorithm
        self.kl_ctrl = build_kl_controller(alg.kl_ctrl.type, alg.kl_ctrl.kl_coef, alg.kl_ctrl.target_kl,
                                           alg.kl_ctrl.horizon) if alg.use_kl_in_reward else None
        self.use_ref = alg.use_kl_in_reward or cfg.actor_rollout_ref.actor.use_kl_loss
        self.step = 0
        self.version = 0
        self.history: list[dict[str, float]] = []
        self.val_generations: list = []  # trainer.log_val_generations samples of the last validation
        self._initial_loader_state = self.loader.state_dict()
        self.counters = {"trainer/worker_restarts": 0.0, "trainer/nan_skipped_steps": 0.0}
        self._init_workers()

    # ---- workers -------------------------------------------------------------------------

    def _init_workers(self) -> None:
        cfg = self.cfg
        world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
        use_gpu = resolve_device(cfg.trainer.device) == "cuda"
        cfg_dict = OmegaConf.to_container(cfg, resolve=True)
        common = dict(cfg=cfg_dict, tokenizer_dir=self.tokenizer_dir, total_steps=self.total_steps)

        def policy_group(role: str, size: int) -> WorkerGroup:
            master = ray.get(ray.remote(num_cpus=0)(_address).remote()) if size > 1 else None
            ranks = [dict(common, role=role, rank=r, world_size=size, master=master) for r in range(size)]
            return WorkerGroup(PolicyWorker, ranks, use_gpu, name=role)

        backend = rollout_backend(cfg)  # the rollout topology, chosen once from the config
        self.actor = policy_group(backend.actor_role, world)
        self.rollout = backend(RolloutContext(cfg, self.actor, policy_group, self.run_dir,
                                              self.tokenizer.eos_token_id, len(self.tokenizer)))
        self.ref = policy_group("ref", world) if self.use_ref else None
        self.reward = WorkerGroup(RewardWorker, [dict(cfg=cfg_dict)], use_gpu=False, name="reward")
        # data-parallel rank of each worker: ranks of one tensor/pipeline-parallel group share a shard
        self.dp_ranks = {id(g): g.call("data_parallel_rank") for g in (self.actor, self.ref) if g is not None}
        if self.rollout.starts_empty:  # the servers start from dummy weights: hand them the actor's first
            self._sync_weights(bump=False)

    def _dp_call(self, group: WorkerGroup, method: str, batch: Batch, *args) -> list:
        """Shard `batch` over the group's data-parallel ranks; one result per shard, in order."""
        ranks = self.dp_ranks[id(group)]
        shards = batch.split(max(ranks) + 1)
        results = {}
        for rank, out in zip(ranks, group.call_shards(method, [shards[r] for r in ranks], *args)):
            results.setdefault(rank, out)
        return [results[r] for r in sorted(results)]

    def shutdown(self) -> None:
        self.rollout.shutdown()
        for group in (self.actor, self.ref, self.reward):
            if group is not None:
                group.shutdown()

    # ---- rollout and reward --------------------------------------------------------------

    def _generate(self, items: list[dict], validate: bool, seed: int) -> tuple[Batch, dict[str, float]]:
        """Rows come back prompt-major with meta filled."""
        rows, metrics = self.rollout.generate([item["input_ids"] for item in items], validate, seed)
        prompts = [items[i]["input_ids"] for i, *_ in rows]
        meta = {
            "uid": [f"{seed}-{i}" for i, *_ in rows],
            "data_source": [items[i]["data_source"] for i, *_ in rows],
            "ground_truth": [items[i]["ground_truth"] for i, *_ in rows],
            "extra_info": [items[i]["extra_info"] for i, *_ in rows],
            "finish_reason": [fin for *_, fin in rows],
        }
        batch = from_samples(prompts, [r[1] for r in rows], [r[2] for r in rows], self.tokenizer.pad_token_id, meta)
        return batch, metrics

    def _score(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        lengths = batch.response_lengths.tolist()
        texts = self.tokenizer.batch_decode(batch.responses, skip_special_tokens=True)
        samples = [RewardSample(response_str=t, response_length=int(n), data_source=ds, ground_truth=gt, extra_info=ei)
                   for t, n, ds, gt, ei in zip(texts, lengths, batch.meta["data_source"], batch.meta["ground_truth"],
                                               batch.meta["extra_info"])]
        result = self.reward.call_rank0("score", samples)
        scores = torch.tensor(result.scores, dtype=torch.float32)
        rewards = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        last = (batch.response_lengths - 1).clamp(min=0)
        rewards[torch.arange(len(batch)), last] = scores  # outcome reward on the last response token
        acc = result.extra.get("acc", [s > 0 for s in result.scores])
        batch = batch.with_(scores=scores, token_level_rewards=rewards,
                            meta={**batch.meta, "acc": [float(a) for a in acc], "response_text": texts})
        return batch, result.metrics

    def _collect(self, timing: dict[str, float]) -> tuple[Batch, dict[str, float]]:
        """Generate and score batches until `train_batch_size` prompts have informative groups
        (DAPO dynamic sampling), or a single batch when filtering is off."""
        fg = self.cfg.algorithm.filter_groups
        want = self.cfg.data.train_batch_size
        state, kept, metrics = DynamicSamplingState(), [], []
        while True:
            items = self.loader.next_batch()
            seed = self.cfg.trainer.seed * 1_000_003 + self.step * 101 + state.num_gen_batches
            with timer("gen", timing):
                batch, gen_metrics = self._generate(items, validate=False, seed=seed)
            gen_metrics["rollout/generated_tokens"] = float(batch.response_lengths.sum())
            with timer("reward", timing):
                batch, reward_metrics = self._score(batch)
            metrics.append({**gen_metrics, **reward_metrics})
            if not fg.enable:
                kept.append(batch.select(list(range(min(len(batch), want * self.cfg.actor_rollout_ref.rollout.n)))))
                break
            values = {"acc": batch.meta["acc"], "score": batch.scores.tolist()}.get(
                fg.metric, batch.token_level_rewards.sum(-1).tolist())
            keep = filter_groups(batch.meta["uid"], values)
            result = accumulate_groups(state, batch.meta["uid"], keep, want, fg.max_num_gen_batches)
            kept.append(batch.select(result.take))
            state = result.state
            if not result.need_more:
                break
        merged = mean_metrics(metrics)
        for key in [k for k in merged if k == "rollout/generated_tokens" or k.startswith("reward/failures_")]:
            merged[key] = sum(m.get(key, 0.0) for m in metrics)  # totals over generation batches
        merged["train/num_gen_batches"] = float(len(metrics))
        return Batch.concat(kept), merged

    # ---- advantages ----------------------------------------------------------------------

    def _advantages(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        alg, metrics = self.cfg.algorithm, {}
        rewards = batch.token_level_rewards
        if self.kl_ctrl is not None:
            rewards, metrics = apply_kl_in_reward(rewards, batch.response_mask, batch.old_log_probs,
                                                  batch.ref_log_probs, self.kl_ctrl.value, alg.kl_penalty)
            self.kl_ctrl.update(metrics["actor/reward_kl_penalty"], n_steps=len(batch))
        estimator = get_adv_estimator(alg.adv_estimator)
        adv, _ = estimator(rewards.sum(-1), batch.response_mask, batch.meta["uid"],
                           norm_adv_by_std_in_grpo=alg.norm_adv_by_std_in_grpo)
        return batch.with_(token_level_rewards=rewards, advantages=adv), metrics

    # ---- weight sync ---------------------------------------------------------------------

    def _sync_weights(self, bump: bool = True) -> float:
        """Trunk and MTP tensors to the rollout; the engine's checksum must equal what was sent,
        or the draft (or target) is stale and speculation would silently degrade. SGLang cannot hash its
        weights: its replicas answer VERSION_CHECKED (the new weight_version was checked; the stale-draft
        guard judges the next batch). -> 1.0 when every rollout rank's checksum was compared, else 0.0."""
        if bump:
            self.version += 1
        pairs = self.rollout.sync_from(self.actor, self.version)
        for rank, (sent, held) in enumerate(pairs):
            if held != VERSION_CHECKED and sent != held:
                raise WeightSyncError(f"weight sync v{self.version}: rollout rank {rank} holds checksum {held[:12]}, "
                                      f"actor sent {sent[:12]}; refusing to generate with stale weights")
        return float(all(held != VERSION_CHECKED for _, held in pairs))

    # ---- one step ------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        timing: dict[str, float] = {}
        dp = max(self.dp_ranks[id(self.actor)]) + 1
        with timer("step", timing):
            batch, metrics = self._collect(timing)
            if self.rollout.sleeps:  # colocated replicas free the devices for the actor's passes
                with timer("rollout_sleep", timing):
                    self.rollout.sleep()
            rows = self.cfg.actor_rollout_ref.actor.ppo_mini_batch_size * self.cfg.actor_rollout_ref.rollout.n
            batch = self._with_old_log_probs(batch, rows, timing)
            if self.ref is not None:
                with timer("ref", timing):
                    batch = batch.with_(ref_log_probs=torch.cat(self._dp_call(self.ref, "compute_log_probs", batch)))
            with timer("adv", timing):
                batch, adv_metrics = self._advantages(batch)
            with timer("update_actor", timing):
                actor_metrics = mean_metrics(self._dp_call(self.actor, "update_policy", batch, max(rows // dp, 1),
                                                           self.step + 1))
            with timer("update_weights", timing):
                metrics["rollout/sync_checksum_verified"] = self._sync_weights()
                self._pass_acceptance_prior(actor_metrics)
        metrics.update(adv_metrics)
        metrics.update(actor_metrics)
        metrics.update(self._batch_metrics(batch))
        metrics.update(timing)
        self.counters["trainer/nan_skipped_steps"] += actor_metrics.get("actor/nan_skipped_updates", 0.0)
        metrics.update(self.counters)
        metrics["trainer/weight_version"] = float(self.version)
        return metrics

    def _pass_acceptance_prior(self, actor_metrics: dict[str, float]) -> None:
        """Adaptive depth starts each batch from what training expects of the draft just synced
        (mtp/expected_chain_accept_rate_k, exact for the on-policy batch) instead of a flat guess."""
        if self.cfg.actor_rollout_ref.model.mtp.speculative_num_steps != "auto":
            return
        rates, k = [], 1
        while f"mtp/expected_chain_accept_rate_{k}" in actor_metrics:
            rates.append(actor_metrics[f"mtp/expected_chain_accept_rate_{k}"])
            k += 1
        if rates:
            self.rollout.set_acceptance_prior(rates)

    def _with_old_log_probs(self, batch: Batch, mini_batch_rows: int, timing: dict[str, float]) -> Batch:
        source = self._old_log_prob_source(len(batch), mini_batch_rows)
        if source == "recompute":
            with timer("old_log_prob", timing):
                return batch.with_(old_log_probs=torch.cat(self._dp_call(self.actor, "compute_log_probs", batch)))
        timing["timing_s/old_log_prob"] = 0.0  # no pass: the key stays on dashboards with the time it took
        return batch.with_(old_log_probs=batch.rollout_log_probs) if source == "rollout" else batch

    def _old_log_prob_source(self, batch_rows: int, mini_batch_rows: int) -> str:
        """Where the PPO ratio's denominator comes from: "rollout" (algorithm.rollout_correction.bypass_mode:
        the rollout's own log-probs), "update" (one epoch, one mini-batch: the update's first and only
        forward runs on the very weights that generated the batch, so the actor takes its own detached
        log-probs there: exact, and a whole forward pass cheaper), or "recompute" (a separate pass)."""
        if self.cfg.algorithm.rollout_correction.bypass_mode:
            return "rollout"
        one_step = self.cfg.actor_rollout_ref.actor.ppo_epochs == 1 and mini_batch_rows >= batch_rows
        return "update" if one_step and self.kl_ctrl is None else "recompute"

    def _batch_metrics(self, batch: Batch) -> dict[str, float]:
        mask = batch.response_mask.bool()
        lengths = batch.response_lengths.float()
        m = {**_stats("critic/score", batch.scores), **_stats("critic/rewards", batch.token_level_rewards.sum(-1)),
             **_stats("critic/advantages", batch.advantages[mask]), **_stats("response_length", lengths),
             **_stats("prompt_length", batch.prompt_mask.sum(-1))}
        m["response_length/clip_ratio"] = float((lengths >= self.cfg.data.max_response_length).float().mean())
        m["critic/acc/mean"] = float(np.mean(batch.meta["acc"]))
        return m

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        n = self.cfg.actor_rollout_ref.rollout.val_kwargs.n
        items = [self.val_set[i] for i in range(len(self.val_set))]
        batch, gen_metrics = self._generate(items, validate=True, seed=self.cfg.trainer.seed)
        batch, _ = self._score(batch)
        metrics = {f"val/{k}": v for k, v in gen_metrics.items()}
        sources = batch.meta["data_source"]
        for source in sorted(set(sources)):
            accs = [a for a, s in zip(batch.meta["acc"], sources) if s == source]
            metrics[f"val-core/{source}/acc/mean@{n}"] = float(np.mean(accs))
        metrics["val-core/acc"] = float(np.mean(batch.meta["acc"]))
        if self.cfg.trainer.log_val_generations > 0:  # logged by fit() with the step's metrics
            inputs = [self.tokenizer.decode(p[m.bool()].tolist(), skip_special_tokens=True)
                      for p, m in zip(batch.prompts, batch.prompt_mask)]
            self.val_generations = pick_generations(inputs, batch.meta["response_text"], batch.scores.tolist(),
                                                    self.cfg.trainer.log_val_generations)
        return metrics

    # ---- the loop ------------------------------------------------------------------------

    def fit(self) -> list[dict[str, float]]:
        t = self.cfg.trainer
        self._maybe_resume(checkpoint.find_resume_path(t))
        tracker = Tracker.from_config(self.cfg, self.total_steps, self.step)
        nan_streak = 0
        try:
            if self.val_set is not None and t.val_before_train and self.step == 0:
                self._log(tracker, self.validate())
            while self.step < self.total_steps:
                try:
                    metrics = self._step_and_validate()
                except WORKER_DEATHS as error:
                    self._recover(error)
                    continue
                self._log(tracker, metrics)
                nan_streak = nan_streak + 1 if metrics.get("actor/nan_skipped_updates", 0) > 0 else 0
                if nan_streak >= t.max_nan_steps:
                    raise NonFiniteLossError(
                        f"{nan_streak} consecutive steps had non-finite loss or gradients (trainer.max_nan_steps="
                        f"{t.max_nan_steps}); stopped. Weights were not updated by them; last checkpoint: "
                        f"{checkpoint.latest(t.default_local_dir)}")
                if t.save_freq > 0 and not nan_streak and (self.step % t.save_freq == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        finally:
            tracker.close()
        return self.history

    def _log(self, tracker: Tracker, metrics: dict[str, float]) -> None:
        tracker.log(metrics, self.step)
        tracker.log_generations(self.val_generations, self.step)
        self.val_generations = []

    def _step_and_validate(self) -> dict[str, float]:
        t = self.cfg.trainer
        metrics = self.train_step()
        self.step += 1
        metrics["trainer/step"] = float(self.step)
        metrics["trainer/epoch"] = float(self.loader.epoch)
        if self.val_set is not None and t.test_freq > 0 and (self.step % t.test_freq == 0 or self.step == self.total_steps):
            with timer("testing", metrics):
                metrics.update(self.validate())
        self.history.append(metrics)
        return metrics

    def _recover(self, error: Exception) -> None:
        """A worker died: recreate every group and continue from the last checkpoint of this run
        (or from the start when there is none yet)."""
        restarts = self.counters["trainer/worker_restarts"] + 1
        if restarts > self.cfg.trainer.max_worker_failures:
            raise RuntimeError(f"worker died {restarts} times (trainer.max_worker_failures="
                               f"{self.cfg.trainer.max_worker_failures}); giving up") from error
        print(f"worker failure at step {self.step + 1} ({type(error).__name__}); recreating workers, "
              f"recovery {restarts}/{self.cfg.trainer.max_worker_failures}", flush=True)
        self.shutdown()
        self._init_workers()
        self._reset_state()
        self._maybe_resume(checkpoint.latest(self.cfg.trainer.default_local_dir))
        self.counters["trainer/worker_restarts"] = restarts

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        state = {"step": self.step, "version": self.version, "loader": self.loader.state_dict(),
                 "kl_coef": self.kl_ctrl.value if self.kl_ctrl else None, "counters": self.counters,
                 "history": self.history}
        return checkpoint.save(self.cfg.trainer.default_local_dir, self.step, state, self.actor, self.cfg,
                               self.cfg.trainer.max_actor_ckpt_to_keep)

    def _reset_state(self) -> None:
        """The state of a fresh run (workers rebuild the same initial weights from the seed)."""
        self.step, self.version, self.history = 0, 0, []
        self.loader.load_state_dict(self._initial_loader_state)
        if self.kl_ctrl is not None:
            self.kl_ctrl.value = self.cfg.algorithm.kl_ctrl.kl_coef
        self._sync_weights()

    def _maybe_resume(self, path: str | None) -> None:
        if path is None:
            return
        state = checkpoint.load(path, self.actor)
        self.step, self.version = state["step"], state["version"]
        self.loader.load_state_dict(state["loader"])
        if self.kl_ctrl is not None:
            self.kl_ctrl.value = state["kl_coef"]
        self.counters.update(state["counters"])
        self.history = state["history"]
        self.version -= 1  # _sync_weights bumps it back to the saved version
        self._sync_weights()
        print(f"resumed from {path} at step {self.step}", flush=True)


def _address():
    from verl_mtp.workers.policy_worker import address

    return address()


def run(cfg) -> list[dict[str, float]]:
    """Start (or join) Ray, train, and shut the workers down."""
    if not ray.is_initialized():
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg.ray_kwargs.ray_init).items() if v is not None}
        if "RAY_ADDRESS" not in os.environ and "address" not in kwargs:
            kwargs.setdefault("num_cpus", _cpus_needed(cfg))
            kwargs.setdefault("include_dashboard", False)
        ray.init(**kwargs)
    trainer = DAPOTrainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


def _cpus_needed(cfg) -> int:
    """Logical CPUs for a local Ray: one per worker bundle (policy ranks, rollout, ref, reward)."""
    world = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    rollout = rollout_backend(cfg).ray_cpus(cfg)
    ref = world if (cfg.algorithm.use_kl_in_reward or cfg.actor_rollout_ref.actor.use_kl_loss) else 0
    return world + rollout + ref + 1
