"""Checks that run once at start, so a bad config fails before any worker spawns.

Every failure is a ConfigError whose one-line message names the full dotted key.
"""

import dataclasses
import importlib
import typing
from typing import Any, Callable, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from verl_mtp.config.schema import RLConfig

STRATEGIES = ("torch", "fsdp", "fsdp2", "megatron")
ROLLOUT_NAMES = ("native", "sglang")
ROLLOUT_MODES = ("sync", "server")
# verl values we know and do not implement: refused with the reason, never mapped to something else
NOT_IMPLEMENTED = {
    "actor_rollout_ref.rollout.name": {
        "vllm": "there is no vLLM adapter; use native, or sglang with rollout.mode=server"},
    "actor_rollout_ref.rollout.mode": {"async": "verl's async agent loop is not implemented; use sync (native "
                                                "engine) or server (HTTP replicas, native or sglang)"},
}
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
TRUNCATIONS = ("error", "left", "right", "filter")
ADV_ESTIMATORS = ("grpo", "rloo")  # or a user function as "pkg.module:function"
POLICY_LOSSES = ("vanilla", "gspo", "clip_cov", "kl_cov")  # algos.registry's (config sits below algos); or a dotted path
KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
LR_SCHEDULERS = ("constant", "cosine")
REWARD_MANAGERS = ("naive", "dapo")
FILTER_METRICS = ("acc", "score", "seq_reward", "seq_final_reward")
LOGGERS = ("console", "jsonl", "tensorboard")
DEVICES = ("auto", "cpu", "cuda")
RESUME_MODES = ("auto", "disable", "resume_path")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
SPEC_ALGORITHMS = ("EAGLE", "NEXTN")
MTP_LOSS_TYPES = ("ce", "soft_ce", "tv")  # algos.mtp_loss.MTP_LOSS_TYPES (config sits below algos)
SYNC_MODES = ("tensor", "distributed")
LAUNCHERS = ("local", "ray")
OVERLONG_KEYS = ("enable", "len", "penalty_factor", "log")
# reward_kwargs each manager's constructor takes
MANAGER_KWARGS = {"naive": (), "dapo": ("overlong_buffer_cfg", "max_resp_len")}

_ARR = "actor_rollout_ref."


class ConfigError(ValueError):
    """A bad config value or key; the message is one line naming the full dotted key."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ------------------------------------------------------------ schema introspection


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is Union and len(args) == 1 else tp


def schema_type(key: str) -> Optional[Any]:
    """Annotated type of a dotted key in RLConfig, or None when the schema does not define it."""
    tp: Any = RLConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = _strip_optional(hints[part])
    return tp


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0])
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a dict"
    return tp.__name__ if isinstance(tp, type) else "a value"


def from_omegaconf(err: OmegaConfBaseException) -> ConfigError:
    """Translate an OmegaConf error into a one-line ConfigError naming the key."""
    key = err.full_key
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)):
        parent, hint = key.rpartition(".")[0], ""
        if parent and typing.get_origin(schema_type(parent)) is dict:
            hint = f" (add keys to the open dict '{parent}' with '+{key}=...')"
        return ConfigError(f"unknown config key '{key}'{hint}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"missing value for key '{key}'")
    if isinstance(err, ValidationError) and schema_type(key) is not None:
        return ConfigError(f"key '{key}': expected {_type_name(schema_type(key))}, got {err.value!r}")
    if isinstance(err, InterpolationResolutionError):
        return ConfigError(f"key '{key}': cannot resolve interpolation: {str(err.msg).splitlines()[0]}")
    return ConfigError(f"key '{key}': {str(err.msg).splitlines()[0]}")


def _check_known_keys(node: Any, tp: Any, prefix: str) -> None:
    # Hydra's `+key=value` adds keys even to dataclass nodes; only open dicts may grow.
    hints = typing.get_type_hints(tp)
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{full}'")
        sub = _strip_optional(hints[key])
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _check_known_keys(value, sub, full + ".")


# ------------------------------------------------------------------- value rules


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be >= {low}"


def _in_range(low: float, high: float, open_low: bool = False) -> tuple[Callable[[Any], bool], str]:
    bracket = "(" if open_low else "["
    return (lambda v: (v > low if open_low else v >= low) and v <= high), f"must be in {bracket}{low}, {high}]"


_PORT = _in_range(1, 65535)

# key -> (predicate, what it must be); null values of Optional keys are skipped.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.max_prompt_length": _at_least(1),
    "data.max_response_length": _at_least(1),
    "data.train_batch_size": _at_least(1),
    "data.gen_batch_size": _at_least(1),
    "data.val_batch_size": _at_least(1),
    _ARR + "model.mtp.num_layers": _at_least(1),
    _ARR + "model.mtp.mtp_loss_scaling_factor": _at_least(0),
    _ARR + "model.mtp.lr_scale": ((lambda v: v > 0), "must be > 0"),
    _ARR + "model.mtp.speculative_eagle_topk": _at_least(1),
    _ARR + "model.mtp.speculative_num_draft_tokens": _at_least(1),
    _ARR + "actor.ppo_mini_batch_size": _at_least(1),
    _ARR + "actor.ppo_micro_batch_size_per_gpu": _at_least(1),
    _ARR + "actor.ppo_max_token_len_per_gpu": _at_least(1),
    _ARR + "actor.ppo_epochs": _at_least(1),
    _ARR + "actor.clip_ratio": _at_least(0),
    _ARR + "actor.clip_ratio_low": _at_least(0),
    _ARR + "actor.clip_ratio_high": _at_least(0),
    _ARR + "actor.kl_loss_coef": _at_least(0),
    _ARR + "actor.loss_scale_factor": _at_least(1),
    _ARR + "actor.policy_loss.clip_cov_ratio": _in_range(0, 1, open_low=True),
    _ARR + "actor.policy_loss.kl_cov_ratio": _in_range(0, 1, open_low=True),
    _ARR + "actor.optim.lr": _at_least(0),
    _ARR + "actor.optim.lr_warmup_steps_ratio": _in_range(0, 1),
    _ARR + "actor.optim.weight_decay": _at_least(0),
    _ARR + "actor.optim.clip_grad": _in_range(0, float("inf"), open_low=True),
    _ARR + "actor.optim.min_lr_ratio": _in_range(0, 1),
    _ARR + "actor.megatron.tensor_model_parallel_size": _at_least(1),
    _ARR + "actor.megatron.pipeline_model_parallel_size": _at_least(1),
    _ARR + "actor.megatron.context_parallel_size": _at_least(1),
    _ARR + "ref.megatron.tensor_model_parallel_size": _at_least(1),
    _ARR + "ref.megatron.pipeline_model_parallel_size": _at_least(1),
    _ARR + "ref.megatron.context_parallel_size": _at_least(1),
    _ARR + "ref.log_prob_micro_batch_size_per_gpu": _at_least(1),
    _ARR + "rollout.n": _at_least(1),
    _ARR + "rollout.temperature": ((lambda v: v > 0), "must be > 0 for training rollouts (the policy's log-probs divide "
                                   "the logits by it; greedy decoding is for validation: rollout.val_kwargs.temperature=0)"),
    _ARR + "rollout.top_p": _in_range(0, 1, open_low=True),
    _ARR + "rollout.top_k": _at_least(-1),
    _ARR + "rollout.max_batch_size": _at_least(1),
    _ARR + "rollout.max_num_seqs": _at_least(1),
    _ARR + "rollout.max_num_batched_tokens": _at_least(1),
    _ARR + "rollout.gpu_memory_utilization": _in_range(0, 1, open_low=True),
    _ARR + "rollout.tensor_model_parallel_size": _at_least(1),
    _ARR + "rollout.log_prob_micro_batch_size_per_gpu": _at_least(1),
    _ARR + "rollout.val_kwargs.n": _at_least(1),
    _ARR + "rollout.val_kwargs.temperature": _at_least(0),
    _ARR + "rollout.val_kwargs.top_p": _in_range(0, 1, open_low=True),
    _ARR + "rollout.val_kwargs.top_k": _at_least(-1),
    _ARR + "rollout.prometheus.port": _PORT,
    _ARR + "rollout.server.num_replicas": _at_least(1),
    _ARR + "rollout.server.base_port": _in_range(0, 65535),  # 0: each replica picks a free port
    "reward_model.num_workers": _at_least(0),
    "reward_model.timeout_s": _in_range(0, float("inf"), open_low=True),
    "algorithm.kl_ctrl.kl_coef": _at_least(0),
    "trainer.nnodes": _at_least(1),
    "trainer.n_gpus_per_node": _at_least(1),
    "trainer.total_epochs": _at_least(1),
    "trainer.total_training_steps": _at_least(1),
    "trainer.log_val_generations": _at_least(0),
    "trainer.max_actor_ckpt_to_keep": _at_least(1),
    "trainer.max_worker_failures": _at_least(0),
    "trainer.max_nan_steps": _at_least(0),
    "trainer.prometheus.port": _PORT,
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.truncation": TRUNCATIONS,
    _ARR + "model.mtp.speculative_algorithm": SPEC_ALGORITHMS,
    _ARR + "model.mtp.loss_type": MTP_LOSS_TYPES,
    _ARR + "actor.strategy": STRATEGIES,
    _ARR + "actor.loss_agg_mode": LOSS_AGG_MODES,
    _ARR + "actor.kl_loss_type": KL_ESTIMATORS,
    _ARR + "actor.optim.lr_scheduler_type": LR_SCHEDULERS,
    _ARR + "actor.fsdp_config.model_dtype": DTYPES,
    _ARR + "actor.fsdp_config.dtype": DTYPES,
    _ARR + "ref.strategy": STRATEGIES,
    _ARR + "rollout.name": ROLLOUT_NAMES,
    _ARR + "rollout.mode": ROLLOUT_MODES,
    _ARR + "rollout.dtype": DTYPES,
    "reward_model.reward_manager": REWARD_MANAGERS,
    "algorithm.kl_penalty": KL_ESTIMATORS,
    "algorithm.kl_ctrl.type": ("fixed", "adaptive"),
    "trainer.device": DEVICES,
    "trainer.resume_mode": RESUME_MODES,
}


def _check_rules(cfg: DictConfig) -> None:
    for key, (ok, must) in _RULES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"key '{key}': {must}, got {value!r}")
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        why = NOT_IMPLEMENTED.get(key, {}).get(value)
        if why:
            raise ConfigError(f"key '{key}': {value!r} is not implemented: {why}")
        if value not in allowed:
            raise ConfigError(f"key '{key}': expected one of {'|'.join(allowed)}, got {value!r}")


# ------------------------------------------------------------ cross-field checks


def _world_size(cfg: DictConfig) -> int:
    return cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node


def _data_parallel_size(cfg: DictConfig) -> int:
    actor = cfg.actor_rollout_ref.actor
    if actor.strategy != "megatron":
        return _world_size(cfg)
    m = actor.megatron
    return _world_size(cfg) // (m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size)


def _check_batch_sizes(cfg: DictConfig) -> None:
    # verl semantics: train_batch_size and ppo_mini_batch_size count prompts; each prompt
    # yields rollout.n responses, and a mini-batch's responses are split over DP ranks.
    actor, n = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout.n
    train, mini = cfg.data.train_batch_size, actor.ppo_mini_batch_size
    if train % mini:
        raise ConfigError(
            f"key '{_ARR}actor.ppo_mini_batch_size': data.train_batch_size={train} must be a multiple of "
            f"ppo_mini_batch_size={mini} (both count prompts)"
        )
    dp = _data_parallel_size(cfg)
    per_rank, rest = divmod(mini * n, dp)
    if rest:
        raise ConfigError(
            f"key '{_ARR}actor.ppo_mini_batch_size': ppo_mini_batch_size * rollout.n = {mini * n} responses "
            f"do not split evenly over {dp} data-parallel ranks"
        )
    micro = actor.ppo_micro_batch_size_per_gpu
    if not actor.use_dynamic_bsz and micro is not None and per_rank % micro:
        raise ConfigError(
            f"key '{_ARR}actor.ppo_micro_batch_size_per_gpu': {micro} does not divide the {per_rank} responses "
            f"per rank per mini-batch (ppo_mini_batch_size * rollout.n / {dp} ranks)"
        )


def _check_parallel(cfg: DictConfig) -> None:
    world = _world_size(cfg)
    actor = cfg.actor_rollout_ref.actor
    if actor.strategy == "megatron":
        m = actor.megatron
        model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
        if world % model_parallel:
            raise ConfigError(
                f"key '{_ARR}actor.megatron.tensor_model_parallel_size': tp*pp*cp = {model_parallel} does not "
                f"divide the {world} devices (trainer.nnodes * trainer.n_gpus_per_node)"
            )
    fsdp_size = actor.fsdp_config.fsdp_size
    if actor.strategy in ("fsdp", "fsdp2") and fsdp_size != -1 and (fsdp_size < 1 or world % fsdp_size):
        raise ConfigError(f"key '{_ARR}actor.fsdp_config.fsdp_size': {fsdp_size} must be -1 (all ranks) or divide "
                          f"the {world} devices (trainer.nnodes * trainer.n_gpus_per_node)")
    rollout = cfg.actor_rollout_ref.rollout
    if rollout.name != "native" and world % rollout.tensor_model_parallel_size:
        raise ConfigError(
            f"key '{_ARR}rollout.tensor_model_parallel_size': {rollout.tensor_model_parallel_size} does not "
            f"divide the {world} devices (trainer.nnodes * trainer.n_gpus_per_node)"
        )


def _check_backends(cfg: DictConfig) -> None:
    rollout = cfg.actor_rollout_ref.rollout.name
    if cfg.trainer.device == "cpu" and rollout != "native":
        raise ConfigError(f"key '{_ARR}rollout.name': {rollout} needs CUDA but trainer.device=cpu")
    if rollout != "native" and cfg.actor_rollout_ref.model.path is None:
        raise ConfigError(f"key '{_ARR}model.path': rollout.name={rollout} loads a checkpoint, so a path is required")


def _check_server(cfg: DictConfig) -> None:
    server, key = cfg.actor_rollout_ref.rollout.server, _ARR + "rollout.server."
    for name, allowed in (("sync_mode", SYNC_MODES), ("launcher", LAUNCHERS)):
        if server[name] is not None and server[name] not in allowed:
            raise ConfigError(f"key '{key}{name}': expected one of {'|'.join(allowed)} (or null), got {server[name]!r}")
    r, colocated = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.hybrid_engine
    if r.mode != "server":
        return
    launcher = server.launcher or ("ray" if cfg.trainer.nnodes > 1 else "local")
    spread = cfg.trainer.nnodes > 1 and (colocated or launcher == "ray")  # replicas on every node
    if spread and server.host in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"key '{key}host': replicas bound to {server.host} on other nodes are unreachable from "
                          f"the driver (trainer.nnodes={cfg.trainer.nnodes}); use 0.0.0.0 or a cluster address")
    if colocated:
        _check_colocated_servers(cfg)
    elif r.name == "sglang" and server.sync_mode == "tensor":
        raise ConfigError(f"key '{key}sync_mode': sglang replicas take tensors (CUDA IPC handles) only from a "
                          "process on their GPUs; split server mode (hybrid_engine=false) needs distributed")


def _check_colocated_servers(cfg: DictConfig) -> None:
    """hybrid_engine with rollout.mode=server: every tp consecutive actor ranks of a node host one replica."""
    r, key = cfg.actor_rollout_ref.rollout, _ARR + "rollout."
    where = "colocated server mode (hybrid_engine=true)"
    if r.server.sync_mode == "distributed":
        raise ConfigError(f"key '{key}server.sync_mode': {where} sends the tensors from the actor ranks hosting "
                          "the replicas (tensor); distributed is for split mode (hybrid_engine=false)")
    if r.server.launcher is not None:
        raise ConfigError(f"key '{key}server.launcher': {where} has the actor ranks start the replicas; leave it "
                          f"unset or set hybrid_engine=false, got {r.server.launcher!r}")
    tp, per_node = r.tensor_model_parallel_size, cfg.trainer.n_gpus_per_node
    if per_node % tp:
        raise ConfigError(f"key '{key}tensor_model_parallel_size': {where} gives each replica {tp} consecutive "
                          f"devices of one node; {tp} does not divide trainer.n_gpus_per_node={per_node}")
    saver = (r.engine_kwargs.get("sglang") or {}).get("enable_memory_saver")
    if r.name == "sglang" and r.free_cache_engine and saver is False:
        raise ConfigError(f"key '{key}free_cache_engine': {where} has the replicas release their memory while the "
                          "actor trains, which needs SGLang's memory saver (engine_kwargs.sglang.enable_memory_saver"
                          "=False turns it off)")
    world = _world_size(cfg)
    if r.server.num_replicas != world // tp:
        raise ConfigError(f"key '{key}server.num_replicas': {where} starts one replica per {tp} actor ranks "
                          f"(tensor_model_parallel_size), so {world // tp} for {world} ranks; got "
                          f"{r.server.num_replicas}")


def _check_mtp(cfg: DictConfig) -> None:
    mtp = cfg.actor_rollout_ref.model.mtp
    for flag in ("enable_train", "enable_rollout"):
        if mtp[flag] and not mtp.enable:
            raise ConfigError(f"key '{_ARR}model.mtp.{flag}': needs {_ARR}model.mtp.enable=True")
    steps = mtp.speculative_num_steps
    if steps != "auto" and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise ConfigError(
            f"key '{_ARR}model.mtp.speculative_num_steps': expected an int >= 0 or 'auto', got {steps!r}"
        )


def _check_actor(cfg: DictConfig) -> None:
    actor = cfg.actor_rollout_ref.actor
    if actor.clip_ratio_c <= 1:
        raise ConfigError(f"key '{_ARR}actor.clip_ratio_c': must be > 1 (dual-clip bound), got {actor.clip_ratio_c}")
    style = actor.optim.warmup_style
    if style is not None and style not in LR_SCHEDULERS:
        raise ConfigError(
            f"key '{_ARR}actor.optim.warmup_style': expected one of {'|'.join(LR_SCHEDULERS)}, got {style!r}"
        )
    if len(actor.optim.betas) != 2:
        raise ConfigError(f"key '{_ARR}actor.optim.betas': expected 2 values, got {list(actor.optim.betas)}")
    _check_function(_ARR + "actor.policy_loss.loss_mode", actor.policy_loss.loss_mode, POLICY_LOSSES)


def _check_function(key: str, name: str, builtins: tuple[str, ...]) -> None:
    """`name` is a built-in, or a 'pkg.module:function' that imports here (not first inside a worker)."""
    if name in builtins:
        return
    module, sep, attr = name.partition(":")
    if not sep:
        raise ConfigError(f"key '{key}': expected one of {'|'.join(builtins)} or 'pkg.module:function', got {name!r}")
    try:
        function = getattr(importlib.import_module(module), attr)
    except Exception as err:  # any error of the user's module: reported in one line
        raise ConfigError(f"key '{key}': cannot load {name!r}: {type(err).__name__}: {err}") from None
    if not callable(function):
        raise ConfigError(f"key '{key}': {name!r} is not callable")


def _check_files(cfg: DictConfig) -> None:
    for key in ("data.train_files", "data.val_files"):
        value = OmegaConf.select(cfg, key)
        files = list(value) if OmegaConf.is_list(value) else [value]
        if value is not None and not (files and all(isinstance(f, str) and f for f in files)):
            raise ConfigError(f"key '{key}': expected a path or a list of paths, got {value!r}")


def _check_filter_groups(cfg: DictConfig) -> None:
    fg = cfg.algorithm.filter_groups
    if not fg.enable:
        return
    if fg.metric not in FILTER_METRICS:
        raise ConfigError(
            f"key 'algorithm.filter_groups.metric': expected one of {'|'.join(FILTER_METRICS)}, got {fg.metric!r}"
        )
    if cfg.data.gen_batch_size < cfg.data.train_batch_size:
        raise ConfigError(
            f"key 'data.gen_batch_size': {cfg.data.gen_batch_size} < data.train_batch_size="
            f"{cfg.data.train_batch_size}; dynamic sampling can only drop groups"
        )


def _check_algorithm(cfg: DictConfig) -> None:
    name = cfg.algorithm.adv_estimator
    if name not in ADV_ESTIMATORS and ":" not in name:
        raise ConfigError(
            f"key 'algorithm.adv_estimator': expected one of {'|'.join(ADV_ESTIMATORS)} or 'pkg.module:function', "
            f"got {name!r} (verl_mtp has no critic, so no gae)"
        )


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.resume_mode == "resume_path" and not t.resume_from_path:
        raise ConfigError("key 'trainer.resume_from_path': required when trainer.resume_mode=resume_path")
    for name in t.logger:
        if name not in LOGGERS:
            raise ConfigError(f"key 'trainer.logger': unknown logger {name!r}; expected some of {'|'.join(LOGGERS)}")


def _check_reward(cfg: DictConfig) -> None:
    if cfg.reward_model.enable:
        raise ConfigError("key 'reward_model.enable': model-based rewards are not supported; use reward_manager")
    resolve_reward_kwargs(cfg)


def resolve_reward_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of the reward manager's constructor, with one effective overlong config.

    verl's DAPO script passes `+reward_model.reward_kwargs.overlong_buffer_cfg.*` and
    `max_resp_len`; the DAPO recipe's YAML uses `reward_model.overlong_buffer.*`. Both
    spellings give the same result: a reward_kwargs field wins over its overlong_buffer
    twin, and max_resp_len defaults to data.max_response_length. The dapo manager gets
    {"overlong_buffer_cfg": {enable, len, penalty_factor, log}, "max_resp_len": int};
    the naive manager takes no arguments.
    """
    kw_key, manager = "reward_model.reward_kwargs", cfg.reward_model.reward_manager
    kwargs = OmegaConf.to_container(cfg.reward_model.reward_kwargs, resolve=True)
    accepted = MANAGER_KWARGS.get(manager, ())
    for name in kwargs:
        if name not in accepted:
            takes = "|".join(accepted) or "nothing"
            raise ConfigError(f"unknown config key '{kw_key}.{name}' (reward manager {manager!r} takes {takes})")
    given = kwargs.get("overlong_buffer_cfg") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"key '{kw_key}.overlong_buffer_cfg': expected a dict, got {given!r}")
    for name in given:
        if name not in OVERLONG_KEYS:
            raise ConfigError(f"unknown config key '{kw_key}.overlong_buffer_cfg.{name}'")

    def source(name: str) -> str:
        return f"{kw_key}.overlong_buffer_cfg.{name}" if name in given else f"reward_model.overlong_buffer.{name}"

    overlong = {name: given.get(name, cfg.reward_model.overlong_buffer[name]) for name in OVERLONG_KEYS}
    for name in ("enable", "log"):
        _expect(isinstance(overlong[name], bool), source(name), "a bool", overlong[name])
    _expect(_is_int(overlong["len"]) and overlong["len"] >= 0, source("len"), "an int >= 0", overlong["len"])
    factor = overlong["penalty_factor"]
    _expect(_is_number(factor) and factor >= 0, source("penalty_factor"), "a number >= 0", factor)
    overlong["penalty_factor"] = float(factor)
    if manager != "dapo":
        if overlong["enable"]:
            raise ConfigError(f"key 'reward_model.reward_manager': the overlong buffer needs dapo, got {manager!r}")
        return {}

    max_resp_len = kwargs.get("max_resp_len", cfg.data.max_response_length)
    _expect(_is_int(max_resp_len) and max_resp_len > 0, f"{kw_key}.max_resp_len", "an int > 0", max_resp_len)
    if overlong["enable"] and not 0 < overlong["len"] <= max_resp_len:
        raise ConfigError(
            f"key '{source('len')}': the overlong buffer must be in [1, max_resp_len={max_resp_len}] "
            f"tokens when enabled, got {overlong['len']}"
        )
    return {"overlong_buffer_cfg": overlong, "max_resp_len": max_resp_len}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"key '{key}': expected {what}, got {value!r}")


# --------------------------------------------------------------------- entry point

_CROSS_CHECKS = (
    _check_files,
    _check_mtp,
    _check_actor,
    _check_backends,
    _check_server,
    _check_parallel,
    _check_batch_sizes,
    _check_filter_groups,
    _check_algorithm,
    _check_trainer,
    _check_reward,
)


def validate(cfg: Union[DictConfig, RLConfig]) -> None:
    """Raise ConfigError (one line, naming the key) if `cfg` cannot drive a run."""
    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    _check_known_keys(OmegaConf.to_container(cfg, resolve=False), RLConfig, "")
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"missing value for key '{missing[0]}'")
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation must resolve to a valid value
        _check_rules(cfg)
        for check in _CROSS_CHECKS:
            check(cfg)
    except OmegaConfBaseException as err:
        raise from_omegaconf(err) from err


# megatron keys the megatron engine cannot honour: key -> (allowed(value, tp), why). Refused at the start of a
# run (check_runnable) and again when an engine is built (engines/megatron_runtime.ParallelSizes), never dropped.
# Expert parallel would need megatron_convert to give each rank its experts and the load-balancing loss
# (RouterTap) to see every expert's tokens; interleaved stages need megatron's pipeline schedules (CUDA).
MEGATRON_UNSUPPORTED: dict[str, tuple[Callable[[Any, int], bool], str]] = {
    "expert_model_parallel_size": (lambda v, tp: v in (None, 1),
                                   "expert parallelism is not implemented (every rank holds all experts); use 1"),
    "expert_tensor_parallel_size": (lambda v, tp: v in (None, tp),
                                    "experts are split like the dense layers, over tensor_model_parallel_size; "
                                    "leave it null"),
    "virtual_pipeline_model_parallel_size": (lambda v, tp: v is None,
                                             "interleaved pipeline stages are not implemented; leave it null"),
}


def megatron_refusal(megatron) -> tuple[str, Any, str] | None:
    """(key, value, why) for the first key of a `megatron` section the engine cannot honour, else None."""
    tp = megatron.get("tensor_model_parallel_size") or 1
    for key, (ok, why) in MEGATRON_UNSUPPORTED.items():
        if not ok(megatron.get(key), tp):
            return key, megatron[key], why
    return None


def check_runnable(cfg: DictConfig) -> None:
    """At the start of a run (not when a config is read, so verl's scripts still parse): refuse what
    we would otherwise run as something else."""
    r, model = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model
    if r.name != "native" and r.mode != "server":
        raise ConfigError(f"key '{_ARR}rollout.mode': rollout.name={r.name} runs as HTTP server replicas here; set "
                          f"rollout.mode=server (mode={r.mode} would silently run the native in-process engine)")
    if cfg.actor_rollout_ref.actor.strategy == "megatron":
        for role in ("actor", "ref"):
            refused = megatron_refusal(cfg.actor_rollout_ref[role].megatron)
            if refused:
                key, value, why = refused
                raise ConfigError(f"key '{_ARR}{role}.megatron.{key}': {value!r}: {why}")
    if cfg.data.train_files is not None and model.path is None and model.tokenizer_path is None:
        raise ConfigError(f"key '{_ARR}model.path': own data (data.train_files) needs a model path (a Hugging Face "
                          "folder with its tokenizer), or model.tokenizer_path for a model built from scratch")
