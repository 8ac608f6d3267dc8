"""Dataclass schemas for the whole config tree (Hydra structured configs).

Key names and defaults follow verl (verl/trainer/config/ppo_megatron_trainer.yaml and the
DAPO recipe) so verl command lines such as
examples/mtp_trainer/test_dapo_mimo_7b_with_mtp_math_megatron.sh work unchanged. Keys
that verl does not have are marked "verl_mtp:". Keys that only matter on GPUs (Megatron
parallelism, offload, SGLang memory knobs) are accepted everywhere, so one command line
serves both places. Keys accepted but not acted on by any backend are listed, with why, in
ignored.py: a run warns about them, or refuses them where ignoring would change the result.

Fields typed Dict[str, Any] are open dicts: any key may be added with `+key=value`, as
in verl. Enumerated strings stay plain `str` (checked by `validate`) so readers compare
against ordinary strings, not Enum members.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

SCHEMA_NAME = "rl_schema"  # name of RLConfig in Hydra's ConfigStore (used in YAML `defaults`)


def _follow(key: str) -> Any:
    """Default that tracks another key until overridden (an OmegaConf interpolation)."""
    return "${" + key + "}"


def _list(*items: Any) -> Any:
    return field(default_factory=lambda: list(items))


def _dict(**items: Any) -> Any:
    # deepcopy: nested defaults must not be shared between instances
    return field(default_factory=lambda: copy.deepcopy(items))


# --------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    train_files: Any = None  # parquet path or list of paths; null = the built-in synthetic math task
    val_files: Any = None  # same forms as train_files; null = synthetic validation split
    prompt_key: str = "prompt"  # column holding the chat-format prompt
    reward_fn_key: str = "data_source"  # column that selects the grader
    max_prompt_length: int = 512  # tokens; longer prompts are handled per `truncation`
    max_response_length: int = 512  # generation budget in tokens
    train_batch_size: int = 1024  # prompts per RL step (responses = this * rollout.n)
    gen_batch_size: int = _follow("data.train_batch_size")  # prompts per generation round (DAPO dynamic sampling)
    val_batch_size: Optional[int] = None  # null = whole validation set in one batch
    truncation: str = "error"  # error | left | right | filter (drop the row)
    filter_overlong_prompts: bool = False  # drop prompts longer than max_prompt_length (sets truncation=filter)
    filter_invalid: bool = False  # verl_mtp: drop malformed rows (counted) instead of failing
    shuffle: bool = True
    seed: int = _follow("trainer.seed")  # dataloader shuffle seed
    return_raw_chat: bool = True  # keep chat messages next to token ids (server-mode rollout)
    trust_remote_code: bool = False  # for the tokenizer / processor
    dataloader_num_workers: int = 8
    train_max_samples: int = -1  # cap on training rows; -1 = all
    val_max_samples: int = -1


# -------------------------------------------------------------------------- model


@dataclass
class MtpConfig:
    """Multi-token-prediction layers (MiMo / DeepSeek-V3 style) and MTP speculative rollout."""

    enable: bool = False  # the model carries MTP layers: load, save and sync them
    enable_train: bool = False  # add the scaled MTP loss to the actor update
    enable_rollout: bool = False  # use the MTP layers as the draft for speculative decoding
    mtp_loss_scaling_factor: float = 0.1  # weight of the MTP loss next to the policy loss
    # verl_mtp: what the MTP loss compares each depth's draft q with: ce (the token, hard label), soft_ce
    # (the detached policy distribution p at the target position, warped as the rollout samples) or tv
    # (1 - sum min(p, q): one minus the draft's expected acceptance)
    loss_type: str = "ce"
    # verl_mtp: the MTP layers' learning rate over actor.optim.lr. The draft chases a moving policy with a
    # few small layers: a higher rate lets it keep up without moving the policy faster (docs/benchmarks.md)
    lr_scale: float = 1.0
    # Keep the MTP gradient off the trunk. verl defaults to False; every recipe that trains
    # MTP during RL detaches, so we default to True.
    detach_encoder: bool = True
    num_layers: int = 1  # verl_mtp: K, MiMo's num_nextn_predict_layers (used for fresh MTP layers)
    speculative_algorithm: str = "EAGLE"  # EAGLE | NEXTN (SGLang names; both mean MTP-as-draft)
    # Draft depth per verify step: an int >= 0 (0 = no speculation) or "auto" (the engine picks
    # the depth per batch and turns speculation off when it does not pay).
    speculative_num_steps: Any = 2
    speculative_eagle_topk: int = 1  # branches per draft step; the native engine drafts a chain
    speculative_num_draft_tokens: Optional[int] = None  # tokens verified per step; null = num_steps + 1


@dataclass
class ScratchModelConfig:
    """verl_mtp: Qwen2-style decoder built from scratch when model.path is null."""

    vocab_size: Optional[int] = None  # null = the tokenizer's vocabulary size
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # mixture of experts, DeepSeek style (verl_mtp.models.moe); 0 routed experts = dense FFN
    n_routed_experts: int = 0
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    moe_intermediate_size: Optional[int] = None  # null = intermediate_size
    router_aux_loss_coef: float = 0.001
    first_k_dense_replace: int = 0
    moe_in_mtp: bool = True
    norm_topk_prob: bool = True


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF folder (Qwen2 or MiMo); null = build `scratch`
    tokenizer_path: Optional[str] = None  # null = the tokenizer next to `path` (or the synthetic task's)
    trust_remote_code: bool = False
    override_config: Dict[str, Any] = _dict()  # keys written over the HF model config
    enable_gradient_checkpointing: bool = False  # verl defaults to True; see ignored.py
    mtp: MtpConfig = field(default_factory=MtpConfig)
    scratch: ScratchModelConfig = field(default_factory=ScratchModelConfig)


# ---------------------------------------------------------------- actor / ref


@dataclass
class OptimConfig:
    optimizer: str = "AdamW"
    lr: float = 1e-6
    lr_warmup_steps: int = -1  # negative = use lr_warmup_steps_ratio
    lr_warmup_steps_ratio: float = 0.0  # fraction of total_training_steps
    total_training_steps: int = -1  # filled in by the trainer at start
    weight_decay: float = 0.01
    betas: List[float] = _list(0.9, 0.999)
    clip_grad: float = 1.0  # max global grad norm
    lr_scheduler_type: str = "constant"  # constant | cosine
    warmup_style: Optional[str] = None  # verl's deprecated spelling of lr_scheduler_type; wins when set
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class MegatronConfig:
    """Megatron-core parallelism and memory knobs (GPU only)."""

    param_offload: bool = False
    grad_offload: bool = False
    optimizer_offload: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = True
    use_distributed_optimizer: bool = True
    use_dist_checkpointing: bool = False
    dist_checkpointing_path: Optional[str] = None
    seed: int = 42
    # verl >= 0.6 defaults to True; mbridge is an extra dependency, so it stays opt-in here.
    use_mbridge: bool = False
    vanilla_mbridge: bool = True
    use_remove_padding: bool = True
    dtype: str = "bfloat16"
    override_ddp_config: Dict[str, Any] = _dict()
    override_transformer_config: Dict[str, Any] = _dict(
        recompute_granularity=None,
        recompute_modules=["core_attn"],
        recompute_method=None,
        recompute_num_layers=None,
        attention_backend="flash",
    )
    override_mcore_model_config: Dict[str, Any] = _dict()


_ACTOR_MEGATRON = "actor_rollout_ref.actor.megatron."


@dataclass
class RefMegatronConfig(MegatronConfig):
    """The reference model mirrors the actor's layout unless told otherwise."""

    param_offload: bool = _follow(_ACTOR_MEGATRON + "param_offload")
    tensor_model_parallel_size: int = _follow(_ACTOR_MEGATRON + "tensor_model_parallel_size")
    pipeline_model_parallel_size: int = _follow(_ACTOR_MEGATRON + "pipeline_model_parallel_size")
    virtual_pipeline_model_parallel_size: Optional[int] = _follow(
        _ACTOR_MEGATRON + "virtual_pipeline_model_parallel_size"
    )
    context_parallel_size: int = _follow(_ACTOR_MEGATRON + "context_parallel_size")
    expert_model_parallel_size: int = _follow(_ACTOR_MEGATRON + "expert_model_parallel_size")
    expert_tensor_parallel_size: Optional[int] = _follow(_ACTOR_MEGATRON + "expert_tensor_parallel_size")
    seed: int = _follow(_ACTOR_MEGATRON + "seed")
    use_mbridge: bool = _follow(_ACTOR_MEGATRON + "use_mbridge")
    override_transformer_config: Dict[str, Any] = _follow(_ACTOR_MEGATRON + "override_transformer_config")


@dataclass
class FsdpConfig:
    """Knobs of the plain-PyTorch strategies (torch = single process / DDP, fsdp, fsdp2)."""

    param_offload: bool = False
    optimizer_offload: bool = False
    reshard_after_forward: bool = True
    fsdp_size: int = -1  # -1 = shard over all ranks
    model_dtype: str = "fp32"  # master-weight dtype
    dtype: str = "bfloat16"  # compute dtype


@dataclass
class CheckpointConfig:
    save_contents: List[str] = _list("model", "optimizer", "extra")
    load_contents: List[str] = _follow(".save_contents")
    async_save: bool = False


@dataclass
class PolicyLossConfig:
    loss_mode: str = "vanilla"  # vanilla | gspo | clip_cov | kl_cov, or a user one as "pkg.module:function"
    clip_cov_ratio: float = 0.0002  # clip_cov: fraction of tokens whose gradient is cut
    clip_cov_lb: float = 1.0  # clip_cov: covariance range of the candidates
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002  # kl_cov: fraction of tokens given the KL penalty
    ppo_kl_coef: float = 0.1  # kl_cov: weight of that penalty


@dataclass
class ActorConfig:
    strategy: str = "torch"  # torch | fsdp | fsdp2 | megatron
    ppo_mini_batch_size: int = 256  # prompts per optimizer step (responses = this * rollout.n)
    ppo_micro_batch_size_per_gpu: Optional[int] = None  # responses per forward; null = a rank's whole mini-batch
    use_dynamic_bsz: bool = False  # pack micro-batches by token count instead
    ppo_max_token_len_per_gpu: int = 16384  # token budget per micro-batch when use_dynamic_bsz
    ppo_epochs: int = 1
    shuffle: bool = False
    clip_ratio: float = 0.2  # symmetric PPO clip; the default of both bounds below
    clip_ratio_low: float = _follow(".clip_ratio")
    clip_ratio_high: float = _follow(".clip_ratio")  # DAPO clip-higher uses e.g. 0.28
    clip_ratio_c: float = 3.0  # dual-clip bound for negative advantages; must be > 1
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    loss_scale_factor: Optional[int] = None  # seq-mean-token-sum-norm's constant; null = data.max_response_length
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False  # KL to the reference model as a loss term (GRPO style)
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    fsdp_config: FsdpConfig = field(default_factory=FsdpConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


_ACTOR = "actor_rollout_ref.actor."


@dataclass
class RefConfig:
    strategy: str = _follow(_ACTOR + "strategy")
    log_prob_micro_batch_size_per_gpu: Optional[int] = None  # null = whole batch share per forward
    log_prob_use_dynamic_bsz: bool = _follow(_ACTOR + "use_dynamic_bsz")
    log_prob_max_token_len_per_gpu: int = _follow(_ACTOR + "ppo_max_token_len_per_gpu")
    megatron: RefMegatronConfig = field(default_factory=RefMegatronConfig)
    fsdp_config: FsdpConfig = field(default_factory=FsdpConfig)


# ------------------------------------------------------------------------ rollout


@dataclass
class SamplingConfig:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = off
    do_sample: bool = False


@dataclass
class PrometheusConfig:
    enable: bool = False
    port: int = 9090
    host: str = "127.0.0.1"  # localhost unless told otherwise


@dataclass
class ServerConfig:
    """verl_mtp: rollout.mode=server, engines as HTTP servers on base_port, base_port+1, ..."""

    num_replicas: int = 1
    host: str = "127.0.0.1"  # 0.0.0.0: all interfaces (replicas on other nodes must be reachable)
    base_port: int = 30000
    # how weights reach the replicas: tensor (in the request) | distributed (the actor's rank 0 broadcasts
    # over a process group the replicas join); null: tensor for native, distributed for sglang
    sync_mode: Optional[str] = None
    # where replicas start: local (subprocesses of the driver's machine) | ray (one Ray actor per replica,
    # on the node holding its GPUs); null: ray when trainer.nnodes > 1, else local
    launcher: Optional[str] = None


_ROLLOUT = "actor_rollout_ref.rollout."


@dataclass
class RolloutConfig:
    name: str = "native"  # native (in-repo engine, CPU or GPU) | sglang | vllm
    mode: str = "sync"  # sync (in-process) | async (Ray actors) | server (HTTP)
    n: int = 1  # responses per prompt (GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = off
    do_sample: bool = True
    prompt_length: int = _follow("data.max_prompt_length")
    response_length: int = _follow("data.max_response_length")
    dtype: str = "bfloat16"
    max_batch_size: int = 64  # verl_mtp: native engine's concurrent sequence slots
    max_num_seqs: int = 256  # SGLang / vLLM concurrency
    max_num_batched_tokens: int = 8192  # token budget per engine step (prefill chunking)
    max_model_len: Optional[int] = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.5  # SGLang / vLLM KV-cache share of GPU memory
    tensor_model_parallel_size: int = 2
    enforce_eager: bool = False
    free_cache_engine: bool = True  # release the KV cache between rollouts (colocated mode)
    update_weights_bucket_megabytes: int = 512  # most tensor bytes per weight-update call (tensor sync)
    load_format: str = "dummy"  # weights arrive by sync from the actor
    ignore_eos: bool = False
    disable_log_stats: bool = True
    calculate_log_probs: bool = False  # also return rollout log-probs
    log_prob_micro_batch_size_per_gpu: Optional[int] = None
    log_prob_use_dynamic_bsz: bool = _follow(_ACTOR + "use_dynamic_bsz")
    log_prob_max_token_len_per_gpu: int = _follow(_ACTOR + "ppo_max_token_len_per_gpu")
    engine_kwargs: Dict[str, Any] = _dict(sglang={}, vllm={})  # passed through to the engine
    val_kwargs: SamplingConfig = field(default_factory=SamplingConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class ActorRolloutRefConfig:
    hybrid_engine: bool = True  # True = actor and rollout colocated in one worker; False = split pools
    nccl_timeout: int = 600  # seconds
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


# ------------------------------------------------------------------------- reward


@dataclass
class OverlongBufferConfig:
    """DAPO soft overlong punishment over the last `len` tokens of the response budget."""

    enable: bool = False
    len: int = 0  # must be set (> 0) when enabled
    penalty_factor: float = 1.0  # DAPO's value; verl's recipe YAML has a 0.0 placeholder, a silent no-op
    log: bool = False  # also report per-sample overlong penalties


@dataclass
class RewardModelConfig:
    enable: bool = False  # model-based reward; verl_mtp only has rule-based graders
    reward_manager: str = "naive"  # naive | dapo
    # Open dict handed to the reward manager; verl's DAPO script passes
    # +reward_model.reward_kwargs.overlong_buffer_cfg.* and max_resp_len here.
    reward_kwargs: Dict[str, Any] = _dict()
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    num_workers: int = 4  # verl_mtp: grader processes; 0 = grade in the calling process
    timeout_s: Optional[float] = 10.0  # verl_mtp: per-sample grading timeout; null = none
    # verl_mtp: score of a sample whose grader raised, hung or crashed. -1 = a wrong answer's
    # score: a failure must never pay better than being wrong.
    failure_score: float = -1.0


@dataclass
class CustomRewardFunctionConfig:
    path: Optional[str] = None  # .py file defining the function; null = built-in graders
    name: str = "compute_score"
    reward_kwargs: Dict[str, Any] = _dict()  # extra keyword arguments of every call


# ---------------------------------------------------------------------- algorithm


@dataclass
class KlCtrlConfig:
    type: str = "fixed"  # fixed | adaptive
    kl_coef: float = 0.001
    horizon: int = 10000
    target_kl: float = 0.1


@dataclass
class FilterGroupsConfig:
    """DAPO dynamic sampling: drop groups whose metric has zero variance, regenerate."""

    enable: bool = False
    metric: Optional[str] = None  # acc | score | seq_reward | seq_final_reward
    max_num_gen_batches: int = 0  # generation rounds per step; <= 0 = unlimited


@dataclass
class RolloutCorrectionConfig:
    bypass_mode: bool = False  # use the rollout's log-probs as the old policy's (skip recompute)


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"  # verl defaults to gae, which needs a critic verl_mtp lacks
    gamma: float = 1.0
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = True
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"  # how the in-reward KL is estimated
    kl_ctrl: KlCtrlConfig = field(default_factory=KlCtrlConfig)
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)


# ------------------------------------------------------------------------ trainer


@dataclass
class TrainerConfig:
    project_name: str = "verl_mtp"
    experiment_name: str = "default"
    logger: List[str] = _list("console")  # console | jsonl | tensorboard
    log_dir: str = "runs/${trainer.project_name}/${trainer.experiment_name}"  # verl_mtp: jsonl + tensorboard
    nnodes: int = 1
    n_gpus_per_node: int = 8  # devices (CPU: worker processes) per node
    device: str = "auto"  # verl_mtp: auto (cuda when available) | cpu | cuda
    total_epochs: int = 30
    total_training_steps: Optional[int] = None  # null = epochs * batches per epoch
    save_freq: int = -1  # steps between checkpoints (plus the last step); <= 0 = never
    test_freq: int = -1  # steps between validations; <= 0 = never
    val_before_train: bool = True
    log_val_generations: int = 0  # validation samples written to the loggers
    resume_mode: str = "auto"  # auto | disable | resume_path
    resume_from_path: Optional[str] = None  # checkpoint folder for resume_mode=resume_path
    default_local_dir: str = "checkpoints/${trainer.project_name}/${trainer.experiment_name}"
    max_actor_ckpt_to_keep: Optional[int] = None  # null = keep all
    balance_batch: bool = False  # verl's True reorders responses by token count per rank: not done here
    critic_warmup: int = 0  # accepted for verl parity; verl_mtp has no critic
    seed: int = 42  # verl_mtp: global seed
    max_worker_failures: int = 3  # verl_mtp: worker restarts from checkpoint before giving up
    max_nan_steps: int = 3  # verl_mtp: consecutive skipped NaN/inf steps before aborting
    prometheus: PrometheusConfig = field(default_factory=lambda: PrometheusConfig(port=9400))  # verl_mtp: exporter


@dataclass
class RayConfig:
    ray_init: Dict[str, Any] = _dict(num_cpus=None)  # kwargs for ray.init


@dataclass
class RLConfig:
    """Root of the config tree."""

    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray_kwargs: RayConfig = field(default_factory=RayConfig)


def register_schema() -> None:
    """Make RLConfig available to YAML files as `defaults: [rl_schema, _self_]`."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RLConfig)
