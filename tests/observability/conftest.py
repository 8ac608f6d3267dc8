"""Synthetic per-step metric dicts shaped like the driver's (same keys, plausible values)."""


def step_metrics(step: int, *, depths: int = 2, sources: tuple[str, ...] = (), **overrides) -> dict[str, float]:
    """One training step's metrics. `sources` adds a validation result per data source."""
    m = {
        "critic/score/mean": -1.0 + 0.05 * step, "critic/score/max": 1.0, "critic/score/min": -1.0,
        "critic/rewards/mean": -1.05 + 0.05 * step, "critic/acc/mean": 0.02 * step,
        "actor/pg_loss": 0.01 * step, "actor/entropy": 1.5, "actor/grad_norm": 0.7, "actor/lr": 1e-4,
        "mtp/loss": 0.3 - 0.001 * step, "rollout/accept_length": 1.0 + 0.1 * depths,
        "rollout/tokens_per_s": 120.0 + step, "rollout/draft_tokens": 50.0, "rollout/accepted_tokens": 30.0,
        "response_length/mean": 18.0 + step % 3, "response_length/max": 24.0, "response_length/min": 4.0,
        "response_length/clip_ratio": 0.125,
        "timing_s/gen": 1.5, "timing_s/reward": 0.25, "timing_s/old_log_prob": 0.5, "timing_s/adv": 0.01,
        "timing_s/update_actor": 2.0, "timing_s/update_weights": 0.25, "timing_s/step": 5.0,
        "train/num_gen_batches": 1.0, "trainer/weight_version": float(step), "trainer/worker_restarts": 0.0,
        "trainer/nan_skipped_steps": 0.0, "reward/failures_exception": 0.0, "reward/failures_timeout": 1.0,
        "reward/failures_crash": 0.0, "trainer/step": float(step), "trainer/epoch": 0.0,
    }
    for d in range(1, depths + 1):
        m[f"rollout/accept_rate_{d}"] = 0.8 / d
        m[f"mtp/acc_{d}"] = 0.85 / d
        m[f"mtp/loss_{d}"] = 1.0 * d
        m[f"mtp/expected_accept_rate_{d}"] = 0.82 / d
        m[f"mtp/expected_chain_accept_rate_{d}"] = 0.82 / d ** 2
    m["mtp/expected_accept_length"] = 1.0 + sum(0.82 / d ** 2 for d in range(1, depths + 1))
    if depths:
        m[f"rollout/depth_rounds_{depths}"] = 10.0 + step
    for i, source in enumerate(sources):
        m[f"val-core/{source}/acc/mean@1"] = 0.1 * (i + 1) + 0.01 * step
    if sources:
        m["val-core/acc"] = sum(m[f"val-core/{s}/acc/mean@1"] for s in sources) / len(sources)
        m["timing_s/testing"] = 3.0
    m.update(overrides)
    return m
