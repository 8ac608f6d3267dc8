"""Config tree: defaults, verl's MiMo DAPO+MTP command line, seed README overrides, errors."""

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from verl_mtp.config import ConfigError, RLConfig, from_hydra, load_config, resolve_reward_kwargs, to_dict, validate

REPO = Path(__file__).resolve().parents[2]

# Every override of volcengine/verl examples/mtp_trainer/test_dapo_mimo_7b_with_mtp_math_megatron.sh
# in order, as the shell hands them to Python: variables substituted with the script's
# values (NNODES=16, NGPUS_PER_NODE=8, gen_tp=4, train_tp=train_pp=train_cp=2, offload=True,
# max_prompt_length=2048, max_response_length=8192, ...) and shell quotes removed.
DATA = "/home/user/verl/data"
MIMO_SCRIPT_OVERRIDES = [
    f"data.train_files={DATA}/dapo-math-17k.parquet",
    f"data.val_files={DATA}/aime-2024.parquet",
    "data.prompt_key=prompt",
    "data.truncation=left",
    "data.max_prompt_length=2048",
    "data.max_response_length=8192",
    "data.train_batch_size=128",
    "actor_rollout_ref.rollout.n=16",
    "algorithm.adv_estimator=grpo",
    "algorithm.use_kl_in_reward=False",
    "algorithm.kl_ctrl.kl_coef=0.0",
    "actor_rollout_ref.actor.use_kl_loss=False",
    "actor_rollout_ref.actor.kl_loss_coef=0.0",
    "actor_rollout_ref.actor.clip_ratio_low=0.2",
    "actor_rollout_ref.actor.clip_ratio_high=0.28",
    "actor_rollout_ref.actor.clip_ratio_c=10.0",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.model.path=/home/user/verl/models/MiMo-7B-RL",
    "actor_rollout_ref.actor.optim.lr=1e-6",
    "actor_rollout_ref.actor.optim.lr_warmup_steps=10",
    "actor_rollout_ref.actor.optim.weight_decay=0.1",
    "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    "actor_rollout_ref.actor.megatron.param_offload=True",
    "actor_rollout_ref.actor.megatron.optimizer_offload=True",
    "actor_rollout_ref.actor.megatron.grad_offload=True",
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
    "actor_rollout_ref.actor.megatron.context_parallel_size=2",
    "actor_rollout_ref.actor.entropy_coeff=0",
    "actor_rollout_ref.actor.optim.clip_grad=1.0",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.80",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
    "actor_rollout_ref.rollout.enable_chunked_prefill=True",
    "actor_rollout_ref.rollout.max_num_batched_tokens=10240",
    "actor_rollout_ref.rollout.temperature=1.0",
    "actor_rollout_ref.rollout.top_p=1.0",
    "actor_rollout_ref.rollout.top_k=-1",
    "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    "actor_rollout_ref.rollout.val_kwargs.top_p=0.7",
    "actor_rollout_ref.rollout.val_kwargs.top_k=-1",
    "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
    "actor_rollout_ref.rollout.val_kwargs.n=1",
    "actor_rollout_ref.rollout.name=sglang",
    "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=2",
    "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=2",
    "actor_rollout_ref.ref.megatron.context_parallel_size=2",
    "actor_rollout_ref.ref.megatron.param_offload=True",
    "reward_model.reward_manager=dapo",
    "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True",
    "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4096",
    "+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
    "+reward_model.reward_kwargs.overlong_buffer_cfg.log=False",
    "+reward_model.reward_kwargs.max_resp_len=8192",
    'trainer.logger=["console","tensorboard"]',
    "trainer.project_name=DAPO",
    "trainer.experiment_name=DAPO-mimo-7b-rl-megatron",
    "trainer.n_gpus_per_node=8",
    "trainer.nnodes=16",
    "trainer.val_before_train=False",
    "trainer.test_freq=10",
    "trainer.save_freq=-1",
    "trainer.total_epochs=10",
    "trainer.resume_mode=auto",
    "trainer.log_val_generations=10",
    "actor_rollout_ref.rollout.disable_log_stats=False",
    "actor_rollout_ref.rollout.prometheus.enable=True",
    "actor_rollout_ref.rollout.prometheus.port=44398",
    "actor_rollout_ref.model.trust_remote_code=True",
    "data.trust_remote_code=True",
    "trainer.total_training_steps=400",
    "actor_rollout_ref.actor.megatron.use_mbridge=True",
    # "${common_params[@]}"
    "actor_rollout_ref.model.mtp.enable=True",
    "actor_rollout_ref.model.mtp.enable_train=True",
    "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1",
    "actor_rollout_ref.model.mtp.detach_encoder=True",
]

# Keys only an earlier revision of the same script passed.
MIMO_SCRIPT_EARLIER_EXTRAS = [
    "actor_rollout_ref.model.mtp.enable_rollout=False",
    "actor_rollout_ref.rollout.calculate_log_probs=True",
    "algorithm.rollout_correction.bypass_mode=True",
]

# Command-line blocks of seeds/003 (the MTP trainer README). They are edits of the script
# above, so each replaces the script's lines for the same keys. Its other blocks (adv_estimator=grpo, offload=True, ...)
# are the script's shell variables, substituted in MIMO_SCRIPT_OVERRIDES.
SEED_BLOCKS = {
    "mtp_core": [
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1",
        "actor_rollout_ref.model.mtp.detach_encoder=True",
    ],
    "sglang": [
        "actor_rollout_ref.rollout.name=sglang",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=4",
        "actor_rollout_ref.rollout.enable_chunked_prefill=True",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.80",
    ],
    "dapo_reward": [
        "reward_model.reward_manager=dapo",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4096",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
        "+reward_model.reward_kwargs.max_resp_len=8192",
    ],
    "trainer": [
        "trainer.total_epochs=10",
        "trainer.total_training_steps=400",
        "trainer.test_freq=10",
        "trainer.save_freq=-1",
        "trainer.val_before_train=False",
        "trainer.log_val_generations=10",
    ],
    "example3_mtp_params": [
        "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.2",
        "actor_rollout_ref.model.mtp.detach_encoder=False",
    ],
    "example4_mtp_rollout": [
        "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True",
        "actor_rollout_ref.model.mtp.speculative_algorithm=EAGLE",
        "actor_rollout_ref.model.mtp.speculative_num_steps=2",
        "actor_rollout_ref.model.mtp.speculative_eagle_topk=2",
        "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=4",
    ],
    "faq_clip_grad_and_perf": [
        "actor_rollout_ref.actor.optim.clip_grad=1.0",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "actor_rollout_ref.actor.megatron.use_mbridge=True",
    ],
    "faq_memory": ["actor_rollout_ref.rollout.gpu_memory_utilization=0.70"],
    "faq_monitoring": [
        "actor_rollout_ref.rollout.prometheus.enable=True",
        "actor_rollout_ref.rollout.prometheus.port=44398",
        'trainer.logger=["console","tensorboard"]',
    ],
}

# The seed's YAML block for actor_rollout_ref.model.mtp.
SEED_MTP_YAML = """
actor_rollout_ref.model.mtp:
  enable: true
  enable_train: true
  enable_rollout: false
  mtp_loss_scaling_factor: 0.1
  detach_encoder: true
"""


def _landed(cfg, overrides):
    """Assert every override's value is what the config now holds."""
    parser = OverridesParser.create()
    for line in overrides:
        override = parser.parse_override(line)
        got = OmegaConf.select(cfg, override.key_or_group)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == override.value(), line


def _edit_script(block):
    """The script with the block's lines replacing the script's lines for the same keys."""
    keys = {line.split("=", 1)[0] for line in block}
    return [line for line in MIMO_SCRIPT_OVERRIDES if line.split("=", 1)[0] not in keys] + block


def _single_line_error(overrides, key, config_name="dapo_trainer"):
    with pytest.raises(ConfigError) as info:
        load_config(overrides, config_name=config_name)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{key}'" in message, message
    return message


def test_config_defaults_load():
    cfg = load_config()
    assert OmegaConf.get_type(cfg) is RLConfig
    assert cfg.trainer.device == "auto" and cfg.trainer.n_gpus_per_node == 1
    assert cfg.actor_rollout_ref.model.path is None
    assert cfg.actor_rollout_ref.model.mtp.enable_train and cfg.actor_rollout_ref.model.mtp.enable_rollout
    assert cfg.actor_rollout_ref.rollout.name == "native" and cfg.actor_rollout_ref.actor.strategy == "torch"
    assert cfg.actor_rollout_ref.model.mtp.speculative_num_steps == "auto"
    assert to_dict(cfg)["trainer"]["logger"] == ["console", "jsonl"]


def test_config_schema_defaults_validate():
    validate(RLConfig())


def test_config_resolved_and_interpolations_follow():
    cfg = load_config(
        ["data.max_response_length=96", "data.train_batch_size=16", "actor_rollout_ref.actor.clip_ratio=0.3"]
    )
    assert cfg.actor_rollout_ref.rollout.response_length == 96
    assert cfg.data.gen_batch_size == 16
    assert cfg.actor_rollout_ref.actor.clip_ratio_c == 3.0
    assert cfg.actor_rollout_ref.actor.clip_ratio_low == 0.2  # dapo_trainer.yaml pins both bounds
    assert not OmegaConf.is_interpolation(cfg.data, "gen_batch_size")  # resolved once at load


@pytest.mark.parametrize("config_name", ["ppo_megatron_trainer.yaml", "dapo_trainer"])
def test_config_mimo_script_overrides_land(config_name):
    cfg = load_config(MIMO_SCRIPT_OVERRIDES, config_name=config_name)
    _landed(cfg, MIMO_SCRIPT_OVERRIDES)
    megatron = cfg.actor_rollout_ref.actor.megatron
    assert megatron.tensor_model_parallel_size == 2 and megatron.context_parallel_size == 2
    assert cfg.actor_rollout_ref.ref.megatron.use_mbridge  # follows the actor
    assert cfg.data.max_response_length == 8192
    assert cfg.trainer.logger == ["console", "tensorboard"]


def test_config_cluster_base_is_megatron_and_needs_paths():
    cfg = load_config(MIMO_SCRIPT_OVERRIDES, config_name="ppo_megatron_trainer.yaml")
    assert cfg.actor_rollout_ref.actor.strategy == "megatron" and cfg.actor_rollout_ref.ref.strategy == "megatron"
    assert cfg.trainer.device == "cuda"
    _single_line_error([], "actor_rollout_ref.model.path", config_name="ppo_megatron_trainer")


def test_config_earlier_script_revision_keys():
    cfg = load_config(MIMO_SCRIPT_OVERRIDES + MIMO_SCRIPT_EARLIER_EXTRAS)
    _landed(cfg, MIMO_SCRIPT_EARLIER_EXTRAS)


@pytest.mark.parametrize("block", sorted(SEED_BLOCKS))
def test_config_seed_blocks_land(block):
    cfg = load_config(_edit_script(SEED_BLOCKS[block]), config_name="ppo_megatron_trainer")
    _landed(cfg, SEED_BLOCKS[block])


def test_config_seed_yaml_block():
    block = OmegaConf.to_container(OmegaConf.create(SEED_MTP_YAML))
    ((prefix, values),) = block.items()
    overrides = [f"{prefix}.{key}={value}" for key, value in values.items()]
    cfg = load_config(overrides)
    assert OmegaConf.to_container(cfg.actor_rollout_ref.model.mtp)["enable_rollout"] is False


def test_config_warmup_style_alias():
    cfg = load_config(["actor_rollout_ref.actor.optim.warmup_style=cosine"])
    assert cfg.actor_rollout_ref.actor.optim.lr_scheduler_type == "cosine"


def test_config_user_adv_estimator_by_dotted_path():
    assert load_config(["algorithm.adv_estimator=my_pkg.adv:fn"]).algorithm.adv_estimator == "my_pkg.adv:fn"


def test_config_shell_quoted_logger_is_a_list():
    (override,) = shlex.split("""trainer.logger='["console","tensorboard"]'""")
    assert load_config([override]).trainer.logger == ["console", "tensorboard"]


def test_config_reward_kwargs_land_in_open_dict():
    cfg = load_config(MIMO_SCRIPT_OVERRIDES)
    kwargs = cfg.reward_model.reward_kwargs
    assert kwargs.max_resp_len == 8192
    assert OmegaConf.to_container(kwargs.overlong_buffer_cfg) == {
        "enable": True, "len": 4096, "penalty_factor": 1.0, "log": False,
    }
    assert resolve_reward_kwargs(cfg) == {
        "overlong_buffer_cfg": {"enable": True, "len": 4096, "penalty_factor": 1.0, "log": False},
        "max_resp_len": 8192,
    }


def test_config_engine_open_dicts():
    extras = [  # the script's commented-out lines, and a Megatron transformer override
        "actor_rollout_ref.rollout.max_num_seqs=32",
        "+actor_rollout_ref.rollout.engine_kwargs.sglang.cuda_graph_max_bs=32",
        "actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full",
        "+actor_rollout_ref.actor.megatron.override_transformer_config.apply_rope_fusion=True",
    ]
    cfg = load_config(MIMO_SCRIPT_OVERRIDES + extras, config_name="ppo_megatron_trainer")
    _landed(cfg, extras)
    ref_override = cfg.actor_rollout_ref.ref.megatron.override_transformer_config
    assert ref_override.recompute_granularity == "full" and ref_override.apply_rope_fusion is True


def test_config_naive_manager_takes_no_kwargs():
    cfg = load_config(["reward_model.reward_manager=naive", "reward_model.overlong_buffer.enable=False"])
    assert resolve_reward_kwargs(cfg) == {}


def test_config_overlong_spellings_are_equivalent():
    common = ["data.max_response_length=8192", "reward_model.reward_manager=dapo"]
    verl_script = load_config(common + [
        "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4096",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1",
        "+reward_model.reward_kwargs.max_resp_len=8192",
    ])
    recipe_yaml = load_config(common + [
        "reward_model.overlong_buffer.enable=True",
        "reward_model.overlong_buffer.len=4096",
        "reward_model.overlong_buffer.penalty_factor=1.0",
    ])
    assert resolve_reward_kwargs(verl_script) == resolve_reward_kwargs(recipe_yaml)
    assert resolve_reward_kwargs(recipe_yaml)["overlong_buffer_cfg"]["penalty_factor"] == 1.0


MTP = "actor_rollout_ref.model.mtp."
ACTOR = "actor_rollout_ref.actor."
ROLLOUT = "actor_rollout_ref.rollout."
ERROR_CASES = [
    ([ACTOR + "clip_ratio_hgh=0.3"], ACTOR + "clip_ratio_hgh"),
    (["+" + ACTOR + "clip_ratio_hgh=0.3"], ACTOR + "clip_ratio_hgh"),
    (["+trainer.prometheus.hots=0.0.0.0"], "trainer.prometheus.hots"),
    (["reward_model.reward_kwargs.max_resp_len=1"], "reward_model.reward_kwargs.max_resp_len"),
    (["+reward_model.reward_kwargs.overlong_buffer_cfg.lenn=4"], "reward_model.reward_kwargs.overlong_buffer_cfg.lenn"),
    (["+reward_model.reward_kwargs.overlong_buffer_cfg.len=abc"], "reward_model.reward_kwargs.overlong_buffer_cfg.len"),
    (["+reward_model.reward_kwargs.extra=1"], "reward_model.reward_kwargs.extra"),
    (["reward_model.reward_manager=naive"], "reward_model.reward_manager"),
    (["reward_model.reward_manager=prime"], "reward_model.reward_manager"),
    (["data.train_batch_size=abc"], "data.train_batch_size"),
    (["data.train_batch_size=[1"], "data.train_batch_size"),
    (["trainer.logger=console"], "trainer.logger"),
    (["data.gen_batch_size=${data.nope}"], "data.gen_batch_size"),
    (["data.train_batch_size=6"], ACTOR + "ppo_mini_batch_size"),
    ([ACTOR + "ppo_micro_batch_size_per_gpu=3"], ACTOR + "ppo_micro_batch_size_per_gpu"),
    (["trainer.n_gpus_per_node=3"], ACTOR + "ppo_mini_batch_size"),
    ([MTP + "enable=False"], MTP + "enable_train"),
    ([MTP + "enable=False", MTP + "enable_train=False"], MTP + "enable_rollout"),
    ([MTP + "speculative_num_steps=-1"], MTP + "speculative_num_steps"),
    ([MTP + "speculative_num_steps=fast"], MTP + "speculative_num_steps"),
    ([MTP + "speculative_num_steps=1.5"], MTP + "speculative_num_steps"),
    ([MTP + "speculative_num_steps=true"], MTP + "speculative_num_steps"),
    ([MTP + "speculative_algorithm=MEDUSA"], MTP + "speculative_algorithm"),
    ([ACTOR + "clip_ratio_low=-0.1"], ACTOR + "clip_ratio_low"),
    ([ACTOR + "clip_ratio_high=-0.1"], ACTOR + "clip_ratio_high"),
    ([ACTOR + "clip_ratio_c=1.0"], ACTOR + "clip_ratio_c"),
    ([ACTOR + "loss_agg_mode=seq-mean"], ACTOR + "loss_agg_mode"),
    ([ACTOR + "strategy=deepspeed"], ACTOR + "strategy"),
    ([ACTOR + "optim.warmup_style=linear"], ACTOR + "optim.warmup_style"),
    (["data.truncation=middle-out"], "data.truncation"),
    (["data.train_files=[]"], "data.train_files"),
    ([ROLLOUT + "n=0"], ROLLOUT + "n"),
    ([ROLLOUT + "top_p=0"], ROLLOUT + "top_p"),
    ([ROLLOUT + "prometheus.port=70000"], ROLLOUT + "prometheus.port"),
    (["trainer.prometheus.port=0"], "trainer.prometheus.port"),
    (["algorithm.filter_groups.enable=True"], "algorithm.filter_groups.metric"),
    (
        ["algorithm.filter_groups.enable=True", "algorithm.filter_groups.metric=acc", "data.gen_batch_size=4"],
        "data.gen_batch_size",
    ),
    (["algorithm.adv_estimator=gae"], "algorithm.adv_estimator"),
    (["reward_model.num_workers=-1"], "reward_model.num_workers"),
    (["trainer.resume_mode=resume_path"], "trainer.resume_from_path"),
    (["trainer.logger=[console,mlflow]"], "trainer.logger"),
    (["trainer.device=cpu", ROLLOUT + "name=sglang"], ROLLOUT + "name"),
    (
        [ACTOR + "strategy=megatron", "trainer.n_gpus_per_node=8", ACTOR + "megatron.tensor_model_parallel_size=3"],
        ACTOR + "megatron.tensor_model_parallel_size",
    ),
    (["reward_model.overlong_buffer.len=65"], "reward_model.overlong_buffer.len"),
    (["reward_model.enable=True"], "reward_model.enable"),
    (["trainer.total_training_steps=0"], "trainer.total_training_steps"),
    ([ROLLOUT + "server.sync_mode=nccl"], ROLLOUT + "server.sync_mode"),
    ([ROLLOUT + "server.launcher=slurm"], ROLLOUT + "server.launcher"),
    (["trainer.device=cuda", ROLLOUT + "name=sglang", ROLLOUT + "mode=server", "actor_rollout_ref.model.path=/m",
      "actor_rollout_ref.hybrid_engine=false", ROLLOUT + "server.sync_mode=tensor"], ROLLOUT + "server.sync_mode"),
    ([ROLLOUT + "mode=server", "trainer.nnodes=2"], ROLLOUT + "server.host"),
    ([ROLLOUT + "mode=server", "actor_rollout_ref.hybrid_engine=false", "trainer.nnodes=2"], ROLLOUT + "server.host"),
    # colocated server mode (hybrid_engine with mode=server): the actor ranks host the replicas
    ([ROLLOUT + "mode=server", ROLLOUT + "server.sync_mode=distributed"], ROLLOUT + "server.sync_mode"),
    ([ROLLOUT + "mode=server", ROLLOUT + "server.launcher=ray"], ROLLOUT + "server.launcher"),
    ([ROLLOUT + "mode=server", ROLLOUT + "server.num_replicas=2"], ROLLOUT + "server.num_replicas"),
    ([ROLLOUT + "mode=server", "trainer.n_gpus_per_node=2", ROLLOUT + "tensor_model_parallel_size=4",
      ROLLOUT + "server.num_replicas=1"], ROLLOUT + "tensor_model_parallel_size"),
    (["trainer.device=cuda", ROLLOUT + "name=sglang", ROLLOUT + "mode=server", "actor_rollout_ref.model.path=/m",
      "+" + ROLLOUT + "engine_kwargs.sglang.enable_memory_saver=false"], ROLLOUT + "free_cache_engine"),
]


@pytest.mark.parametrize("overrides,key", ERROR_CASES, ids=[" ".join(o) for o, _ in ERROR_CASES])
def test_config_errors_name_the_key(overrides, key):
    _single_line_error(overrides, key)


def test_config_error_messages_read_well():
    assert _single_line_error([ACTOR + "clip_ratio_hgh=0.3"], ACTOR + "clip_ratio_hgh") == (
        f"unknown config key '{ACTOR}clip_ratio_hgh'"
    )
    assert _single_line_error(["data.train_batch_size=abc"], "data.train_batch_size") == (
        "key 'data.train_batch_size': expected int, got 'abc'"
    )
    hint = _single_line_error(["reward_model.reward_kwargs.max_resp_len=1"], "reward_model.reward_kwargs.max_resp_len")
    assert "+reward_model.reward_kwargs.max_resp_len=" in hint


def test_config_unknown_config_name():
    with pytest.raises(ConfigError, match="nope"):
        load_config(config_name="nope")


def test_config_from_hydra_types_an_untyped_config():
    cfg = from_hydra(OmegaConf.create({"data": {"train_batch_size": 512}}))
    assert OmegaConf.get_type(cfg) is RLConfig and cfg.data.gen_batch_size == 512
    with pytest.raises(ConfigError, match="unknown config key 'data.bogus'"):
        from_hydra(OmegaConf.create({"data": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="key 'data.train_batch_size': expected int, got 'x'"):
        from_hydra(OmegaConf.create({"data": {"train_batch_size": "x"}}))


def test_config_validate_catches_later_edits():
    cfg = load_config()
    cfg.actor_rollout_ref.rollout.n = 0
    with pytest.raises(ConfigError, match="'actor_rollout_ref.rollout.n'"):
        validate(cfg)


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_config_hydra_main_entry_point(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import hydra
        from verl_mtp.config import CONFIG_NAME, CONFIG_PATH, HYDRA_VERSION_BASE, from_hydra, load_config

        @hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=HYDRA_VERSION_BASE)
        def main(cfg):
            cfg = from_hydra(cfg)
            nested = load_config(["data.train_batch_size=32"])  # composing again inside the app
            print("OK", cfg.data.train_batch_size, cfg.reward_model.reward_kwargs.max_resp_len,
                  nested.data.train_batch_size)

        main()
    """))
    overrides = ["data.train_batch_size=16", "+reward_model.reward_kwargs.max_resp_len=64", "hydra.run.dir=."]
    result = _run([str(app), *overrides], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["OK", "16", "64", "32"]


def test_config_import_stays_light(tmp_path):
    code = "import sys, verl_mtp.config; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    result = _run(["-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_config_from_a_users_folder_extends_ours(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - ppo_megatron_trainer\n  - _self_\n"
                                        "data:\n  train_batch_size: 512\n")
    cfg = load_config(["actor_rollout_ref.model.path=/m"], config_name="mine", config_path=str(tmp_path))
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.actor.strategy) == (512, "megatron")
    assert load_config().data.train_batch_size == 8  # ours again afterwards: no folder lingers
