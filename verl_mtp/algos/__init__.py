"""Pure tensor functions of the RL algorithm: advantages, policy loss, KL, dynamic sampling,
loss aggregation, LR schedule and micro-batching. Estimators and losses are looked up by
name (``get_adv_estimator("grpo")``, ``get_policy_loss("vanilla")``) or by dotted path.
"""

from .advantages import compute_grpo_outcome_advantage, compute_rloo_outcome_advantage, index_groups
from .batching import epoch_orders, partition_by_token_budget, split_into_micro_batches
from .dynamic_sampling import AccumulateResult, DynamicSamplingState, accumulate_groups, filter_groups
from .kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_in_reward,
    build_kl_controller,
    kl_penalty,
)
from .policy_loss import compute_policy_loss
from .registry import get_adv_estimator, get_policy_loss, register_adv_estimator, register_policy_loss
from .schedule import lr_lambda
from .tensor_ops import (
    LOSS_AGG_MODES,
    LossAggregation,
    agg_loss,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
)

from .mtp_loss import compute_mtp_loss

__all__ = [
    "LOSS_AGG_MODES",
    "AccumulateResult",
    "AdaptiveKLController",
    "DynamicSamplingState",
    "FixedKLController",
    "LossAggregation",
    "accumulate_groups",
    "agg_loss",
    "apply_kl_in_reward",
    "build_kl_controller",
    "compute_grpo_outcome_advantage",
    "compute_mtp_loss",
    "compute_policy_loss",
    "compute_rloo_outcome_advantage",
    "entropy_from_logits",
    "epoch_orders",
    "filter_groups",
    "get_adv_estimator",
    "get_policy_loss",
    "index_groups",
    "kl_penalty",
    "logprobs_from_logits",
    "lr_lambda",
    "masked_mean",
    "masked_sum",
    "partition_by_token_budget",
    "register_adv_estimator",
    "register_policy_loss",
    "split_into_micro_batches",
]
