"""SGLang launch arguments from our config: the cluster recipe's overrides (the seed setup) mapped to
`sglang.launch_server` flags, the CPU recipe mapped to our server's flags; a GPU smoke test (skipped here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from verl_mtp.config import load_config
from verl_mtp.rollout.client import (colocated_replica_groups, colocated_servers, native_server_args,
                                     server_launcher, server_sync_mode, weight_update_group_for)
from verl_mtp.rollout.server import parse_args, speculative_depth
from verl_mtp.rollout.sglang import (check_model_folder, check_sglang_support, launch_command, replica_layout, server_cli_args,
                                     sglang_server_args, speculative_args)
from tests.conftest import needs_sglang

REPO = Path(__file__).resolve().parents[2]
CLUSTER_RECIPE = REPO / "recipes" / "dapo_mimo_7b_mtp_megatron_sglang.sh"
CPU_RECIPE = REPO / "recipes" / "server_mode_cpu.sh"


def recipe_overrides(path, **env):
    out = subprocess.run(["bash", str(path)], env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True,
                         text=True, timeout=30, check=True)
    return out.stdout.splitlines()


@pytest.fixture(scope="module")
def cluster_cfg():
    return load_config(recipe_overrides(CLUSTER_RECIPE, RAY_DATA_HOME="/data"), config_name="ppo_megatron_trainer")


def test_cluster_recipe_is_the_seed_setup(cluster_cfg):
    cfg = cluster_cfg
    arr = cfg.actor_rollout_ref
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, cfg.trainer.device) == (16, 8, "cuda")
    m = arr.actor.megatron
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size) == (2, 2, 2)
    assert m.param_offload and m.optimizer_offload and m.grad_offload and arr.actor.strategy == "megatron"
    assert (arr.rollout.name, arr.rollout.mode, arr.rollout.tensor_model_parallel_size) == ("sglang", "server", 4)
    assert arr.rollout.server.num_replicas == 16 * 8 // 4 and arr.rollout.n == 16
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (2048, 8192)
    assert OmegaConf.to_container(cfg.reward_model.reward_kwargs) == {
        "overlong_buffer_cfg": {"enable": True, "len": 4096, "penalty_factor": 1.0, "log": False}, "max_resp_len": 8192}
    mtp = arr.model.mtp
    assert mtp.enable and mtp.enable_train and mtp.detach_encoder and mtp.mtp_loss_scaling_factor == 0.1
    assert arr.model.path == "/data/models/MiMo-7B-RL" and cfg.trainer.total_training_steps == 400


def test_cluster_recipe_maps_to_sglang_flags(cluster_cfg):
    args = sglang_server_args(cluster_cfg, port=31000, base_gpu_id=4)
    assert {k: args[k] for k in ("model_path", "host", "port", "tp_size", "base_gpu_id", "mem_fraction_static",
                                 "context_length", "chunked_prefill_size", "load_format", "skip_tokenizer_init")} == {
        "model_path": "/data/models/MiMo-7B-RL", "host": "127.0.0.1", "port": 31000, "tp_size": 4, "base_gpu_id": 4,
        "mem_fraction_static": 0.8, "context_length": 10240, "chunked_prefill_size": 10240, "load_format": "dummy",
        "skip_tokenizer_init": True}
    assert {k: v for k, v in args.items() if k.startswith("speculative_")} == {
        "speculative_algorithm": "EAGLE", "speculative_num_steps": 2, "speculative_eagle_topk": 2,
        "speculative_num_draft_tokens": 4}
    assert args["enable_draft_weights_cpu_backup"] and args["enable_weights_cpu_backup"] and args["enable_metrics"]
    cmd = launch_command(args)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    pairs = dict(zip(cmd[3::1], cmd[4::1]))
    assert pairs["--speculative-num-draft-tokens"] == "4" and pairs["--mem-fraction-static"] == "0.8"
    assert pairs["--tp-size"] == "4" and "--enable-draft-weights-cpu-backup" in cmd
    assert "--disable-radix-cache" not in cmd and "--disable-cuda-graph" not in cmd  # False flags are omitted


def test_cluster_recipe_without_mtp_rollout_does_not_speculate():
    cfg = load_config(recipe_overrides(CLUSTER_RECIPE, MTP_ROLLOUT="False"), config_name="ppo_megatron_trainer")
    args = sglang_server_args(cfg)
    assert not any(k.startswith("speculative_") for k in args) and "enable_draft_weights_cpu_backup" not in args
    assert cfg.actor_rollout_ref.model.mtp.enable_train  # the MTP layer is still trained


def test_engine_kwargs_pass_through_last(cluster_cfg):
    extra = ["+actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend=fa3",
             "+actor_rollout_ref.rollout.engine_kwargs.sglang.tp_size=8"]
    cfg = load_config(recipe_overrides(CLUSTER_RECIPE) + extra, config_name="ppo_megatron_trainer")
    args = sglang_server_args(cfg)
    assert args["attention_backend"] == "fa3" and args["tp_size"] == 8


def test_list_and_dict_engine_kwargs_become_sglang_values_not_python_reprs():
    argv = server_cli_args({"cuda_graph_bs": [1, 2, 4], "json_model_override_args": {"a": [1, "b"]}, "tp_size": 2})
    assert argv == ["--cuda-graph-bs", "1", "2", "4", "--json-model-override-args", '{"a": [1, "b"]}',
                    "--tp-size", "2"]  # parsed by SGLang's own parser in tests/rollout/sglang_contract


@pytest.mark.parametrize("overrides, version, needle", [
    (["actor_rollout_ref.model.mtp.num_layers=2"], "0.5.23",
     "key 'actor_rollout_ref.model.mtp.num_layers': SGLang 0.5.23 drafts with 1 MTP layer"),
    ([], "0.5.6", "key 'actor_rollout_ref.rollout.server.sync_mode': distributed sync on SGLang 0.5.6 updates the "
                  "target only"),
    ([], "0.5.6.post2", "distributed sync on SGLang 0.5.6.post2 updates the target only"),
    ([], "0.5.9", r"SGLang 0.5.9 is not a supported version \(tested: 0.5.6, 0.5.6.post2, 0.5.23\)"),
])
def test_runs_an_sglang_version_cannot_do_are_refused_in_one_line(overrides, version, needle):
    split = ["actor_rollout_ref.hybrid_engine=False", "actor_rollout_ref.rollout.server.sync_mode=distributed"]
    cfg = load_config(recipe_overrides(CLUSTER_RECIPE) + split + overrides, config_name="ppo_megatron_trainer")
    with pytest.raises(ValueError, match=needle) as info:
        check_sglang_support(cfg, version)
    assert "\n" not in str(info.value)


def test_a_folder_with_its_own_code_needs_trust_remote_code_in_one_line(tmp_path):
    """Every MiMo folder we save carries modeling code and auto_map; SGLang reads it through AutoConfig."""
    from verl_mtp.models import MTPCausalLM, ModelConfig

    MTPCausalLM(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, num_nextn_predict_layers=1)
                ).save_pretrained(tmp_path / "ckpt")
    base = recipe_overrides(CLUSTER_RECIPE)
    trusting = load_config(base, config_name="ppo_megatron_trainer")
    check_model_folder(trusting, str(tmp_path / "ckpt"))
    wary = load_config(base + ["actor_rollout_ref.model.trust_remote_code=False"], config_name="ppo_megatron_trainer")
    with pytest.raises(ValueError, match="key 'actor_rollout_ref.model.trust_remote_code': .* 'mimo' folder with its "
                                         "own modeling code") as info:
        check_model_folder(wary, str(tmp_path / "ckpt"))
    assert "\n" not in str(info.value)
    check_model_folder(wary, str(tmp_path / "no_such_folder"))  # a hub name or a path on the GPU nodes: SGLang's call


def test_supported_runs_pass_the_version_check(cluster_cfg):
    check_sglang_support(cluster_cfg, "0.5.6")  # colocated tensor sync reaches the draft on every version
    split = ["actor_rollout_ref.hybrid_engine=False", "actor_rollout_ref.rollout.server.sync_mode=distributed"]
    check_sglang_support(load_config(recipe_overrides(CLUSTER_RECIPE) + split, config_name="ppo_megatron_trainer"),
                         "0.5.23")


@pytest.mark.parametrize("mtp, needle", [
    ({"speculative_num_steps": "auto", "speculative_eagle_topk": 1}, "speculative_num_steps': SGLang needs a fixed"),
    ({"speculative_num_steps": 3, "speculative_eagle_topk": 4}, "speculative_num_draft_tokens': must be set"),
])
def test_speculative_args_errors_name_the_key(mtp, needle):
    node = OmegaConf.create({"speculative_algorithm": "NEXTN", "speculative_num_draft_tokens": None, **mtp})
    with pytest.raises(ValueError, match=needle):
        speculative_args(node)


def test_chain_draft_tokens_default_to_steps_plus_one():
    node = OmegaConf.create({"speculative_algorithm": "NEXTN", "speculative_num_steps": 3, "speculative_eagle_topk": 1,
                             "speculative_num_draft_tokens": None})
    assert speculative_args(node)["speculative_num_draft_tokens"] == 4


def test_cluster_recipe_colocates_the_replicas_on_the_training_gpus(cluster_cfg):
    """The seed's hybrid engine: the 32 replicas of 4 GPUs are the 128 training GPUs, started by the actor
    ranks, sleeping (memory saver) while the actor trains."""
    cfg = cluster_cfg
    r = cfg.actor_rollout_ref.rollout
    assert colocated_servers(cfg) and r.free_cache_engine and r.server.host == "0.0.0.0"
    assert r.server.num_replicas * r.tensor_model_parallel_size == cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    assert r.server.launcher is None and r.server.sync_mode is None  # tensor sync, from the actor ranks
    # rank k runs on node k // 8, GPU k % 8: ranks 0-3 host replica 0 on GPUs 0-3, ranks 4-7 replica 1, ...
    placements = [(f"10.0.0.{k // 8}", [str(k % 8)]) for k in range(128)]
    groups = colocated_replica_groups(placements, r.tensor_model_parallel_size)
    assert len(groups) == 32 and groups[:3] == [(0, ["0", "1", "2", "3"]), (4, ["4", "5", "6", "7"]),
                                                (8, ["0", "1", "2", "3"])]
    args = sglang_server_args(cfg)  # the group's GPUs are made visible to the server: it starts at 0
    assert args["enable_memory_saver"] and (args["tp_size"], args["base_gpu_id"]) == (4, 0)


def test_colocated_groups_stay_on_one_node():
    placements = [("10.0.0.1", ["0"]), ("10.0.0.1", ["1"]), ("10.0.0.1", ["2"]), ("10.0.0.2", ["0"])]
    with pytest.raises(ValueError, match=r"replica 1: actor ranks 2..3 are on nodes \['10.0.0.1', '10.0.0.2'\]"):
        colocated_replica_groups(placements, 2)
    assert colocated_replica_groups([("n", []), ("n", [])], 1) == [(0, []), (1, [])]  # CPU: no devices


def test_split_server_mode_broadcasts_weights_to_ray_launched_replicas():
    cfg = load_config(recipe_overrides(CLUSTER_RECIPE) + ["actor_rollout_ref.hybrid_engine=False"],
                      config_name="ppo_megatron_trainer")
    r = cfg.actor_rollout_ref.rollout
    assert (server_sync_mode(r), server_launcher(cfg), colocated_servers(cfg)) == ("distributed", "ray", False)
    assert not sglang_server_args(cfg)["enable_memory_saver"]
    group = weight_update_group_for(cfg, "10.0.0.1", 29500)
    # the trainer is rank 0; each of the 32 replicas joins with its 4 tensor-parallel ranks
    assert group["world_size"] == 1 + 32 * 4 and group["rank_offsets"][:3] == [1, 5, 9] and group["backend"] == "nccl"


def test_cli_flags_and_replica_layout(cluster_cfg):
    assert server_cli_args({"a_b": 1, "flag": True, "off": False, "unset": None, "x": "y"}) == ["--a-b", "1", "--flag",
                                                                                                "--x", "y"]
    assert replica_layout(cluster_cfg, 2, 30000) == [(30000, 0), (30001, 4)]
    with pytest.raises(ValueError, match="launch them per node"):
        replica_layout(cluster_cfg, 3, 30000)


def test_cpu_recipe_maps_to_native_server_flags():
    cfg = load_config(recipe_overrides(CPU_RECIPE))
    assert (cfg.actor_rollout_ref.rollout.mode, cfg.actor_rollout_ref.rollout.server.num_replicas) == ("server", 2)
    flags = native_server_args(cfg)
    args = parse_args(["--model-path", "unused", *flags])
    assert (args.speculative_algorithm, args.speculative_num_steps, args.load_format) == ("EAGLE", "auto", "dummy")
    assert args.context_length == cfg.data.max_prompt_length + cfg.data.max_response_length
    assert speculative_depth(args, num_mtp_layers=1) == "auto" and args.host == "127.0.0.1"
    with pytest.raises(SystemExit, match="no MTP layers"):
        speculative_depth(args, num_mtp_layers=0)
    with pytest.raises(SystemExit, match="must be 1"):
        speculative_depth(parse_args(["--model-path", "x", "--speculative-algorithm", "NEXTN",
                                      "--speculative-eagle-topk", "2"]), num_mtp_layers=1)


@pytest.mark.gpu
@needs_sglang
def test_gpu_sglang_replica_speaks_the_protocol_and_takes_weights(tmp_path):
    """One SGLang replica with MTP speculation: /generate carries spec_* counters, and a colocated
    (CUDA IPC) sync of trunk + MTP tensors lands with the new weight_version."""
    from tests.conftest import toy_config
    from verl_mtp.models import MTPCausalLM
    from verl_mtp.rollout import SamplingParams
    from verl_mtp.rollout.client import VERSION_CHECKED, ReplicaClient, push_weights
    from verl_mtp.rollout.replica_payloads import ReplicaPayloads
    from verl_mtp.rollout.sglang import FLATTENED_BUCKET, launch_sglang_replicas, sglang_tensor_payload, update_buckets

    torch.manual_seed(0)
    model = MTPCausalLM(toy_config(vocab_size=256, num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path)
    arr = "actor_rollout_ref."
    cfg = load_config(["trainer.device=cuda", "trainer.n_gpus_per_node=1", f"{arr}rollout.name=sglang",
                       f"{arr}rollout.mode=server", f"{arr}rollout.tensor_model_parallel_size=1",
                       f"{arr}model.path={tmp_path}", f"{arr}rollout.load_format=auto",
                       f"{arr}model.mtp.speculative_num_steps=1"])
    (replica,) = launch_sglang_replicas(cfg, 1, base_port=31234, log_dir=str(tmp_path / "logs"), startup_timeout=900)
    try:
        client = ReplicaClient(replica.url, timeout=300)
        items = client.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=8))
        assert "spec_verify_ct" in items[0]["meta_info"]
        # CPU tensors, as Megatron's TP/PP gather leaves them: the payload moves them to this GPU itself;
        # small buckets, so trunk and draft each take several flattened-bucket updates
        named = dict(model.state_dict())
        payloads = ReplicaPayloads(sglang_tensor_payload)  # TP 1: this process builds the only entry
        held = push_weights([client], named, 1, encode=payloads.entries, load_format=FLATTENED_BUCKET,
                            bucket_bytes=64 << 10)
        payloads.finish(len(update_buckets(named.items(), 64 << 10)))
        assert held == [VERSION_CHECKED] and client.request("GET", "/model_info")["weight_version"] == "1"
    finally:
        replica.stop()


def _open_like_the_scheduler(entry: str):
    """What SGLang's scheduler rank does with its entry of serialized_named_tensors (its own process):
    patch the reductions, deserialize, rebuild the flattened bucket's tensors."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    monkey_patch_torch_reductions()
    data = MultiprocessingSerializer.deserialize(entry)
    tensors = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
    return [(name, t.device.type, str(t.dtype), t.float().cpu().tolist()) for name, t in tensors.reconstruct_tensors()]


@pytest.mark.gpu
@needs_sglang
def test_gpu_tensor_payload_moves_cpu_tensors_to_the_gpu_and_opens_in_another_process():
    """Megatron's TP/PP gather leaves CPU tensors, which no CUDA IPC handle can name: the payload puts them
    on this rank's GPU first, as one FlattenedTensorBucket whose CUDA IPC handle another process opens as
    SGLang's scheduler does, while the sender keeps the flat tensor alive."""
    import multiprocessing

    from verl_mtp.rollout.sglang import sglang_tensor_payload

    named = [("model.norm.weight", torch.arange(6.0).reshape(2, 3)),
             ("model.mtp_layers.0.input_proj.weight", torch.ones(4, dtype=torch.bfloat16))]
    entry, keep = sglang_tensor_payload(named)
    assert keep.is_cuda and all(not t.is_cuda for _, t in named)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        opened = pool.apply(_open_like_the_scheduler, (entry,))
    assert opened == [(name, "cuda", str(t.dtype), t.float().tolist()) for name, t in named]
