"""The megatron keys the engine cannot honour are refused in one line naming the key, never dropped."""

import pytest

from verl_mtp.config import ConfigError, load_config
from verl_mtp.config.validate import check_runnable
from verl_mtp.engines.megatron_runtime import ParallelSizes


@pytest.mark.parametrize("key,value,tp", [("expert_model_parallel_size", 2, 1),
                                          ("expert_tensor_parallel_size", 1, 2),
                                          ("virtual_pipeline_model_parallel_size", 2, 2)])
def test_unsupported_parallel_keys_are_refused_naming_the_key(key, value, tp):
    with pytest.raises(ValueError, match=rf"^actor_rollout_ref\.actor\.megatron\.{key}={value}: [^\n]+$"):
        ParallelSizes.from_config({key: value, "tensor_model_parallel_size": tp})


def test_their_defaults_and_equivalent_values_are_accepted():
    """verl's defaults (EP 1, ETP and VPP null) and ETP equal to TP (how the experts are split anyway)."""
    for cfg in ({"expert_model_parallel_size": 1, "expert_tensor_parallel_size": None,
                 "virtual_pipeline_model_parallel_size": None},
                {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 2}):
        assert ParallelSizes.from_config(cfg).tensor_model_parallel_size == cfg.get("tensor_model_parallel_size", 1)


@pytest.mark.parametrize("role", ["actor", "ref"])
@pytest.mark.parametrize("key,value,tp", [("expert_model_parallel_size", 2, 1),
                                          ("expert_tensor_parallel_size", 1, 2),
                                          ("virtual_pipeline_model_parallel_size", 2, 2)])
def test_they_are_refused_when_the_run_starts_before_any_worker_exists(key, value, tp, role):
    """`verl-mtp dapo` calls check_runnable before it starts Ray: one line naming the role's key."""
    m = f"actor_rollout_ref.{role}.megatron."
    base = ["actor_rollout_ref.actor.strategy=megatron", "trainer.n_gpus_per_node=2",
            f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}"]
    with pytest.raises(ConfigError, match=rf"^key '{m}{key}': {value}: [^\n]+$"):
        check_runnable(load_config([*base, f"{m}{key}={value}"]))
    check_runnable(load_config(base))
