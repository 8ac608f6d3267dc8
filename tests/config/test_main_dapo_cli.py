"""`verl-mtp dapo` is a Hydra app: verl's flags, user YAMLs over ours, one-line errors before Ray starts.

Every command here exits before training (`--cfg`, or a refusal at start), so each takes about a second.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARR = "actor_rollout_ref."


def dapo(*args, cwd, module="verl_mtp.trainer.main_dapo"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def composed(*args, cwd) -> dict:
    result = dapo("--cfg", "job", *args, cwd=cwd) if "--cfg" not in " ".join(args) else dapo(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("flags", [
    ["--config-name", "ppo_megatron_trainer"],
    ["--config-name=ppo_megatron_trainer.yaml"],
    ["-cn", "ppo_megatron_trainer"],
    ["--cfg=job", "-cn=ppo_megatron_trainer"],
])
def test_cfg_job_prints_the_composed_config_in_every_flag_form(tmp_path, flags):
    cfg = composed(*flags, "data.train_batch_size=16", cwd=tmp_path)
    assert cfg["actor_rollout_ref"]["actor"]["strategy"] == "megatron"
    assert cfg["data"]["train_batch_size"] == 16
    assert not (tmp_path / "runs").exists()  # printed, nothing run


@pytest.fixture
def user_configs(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "mine.yaml").write_text(yaml.safe_dump({
        "defaults": ["ppo_megatron_trainer", "_self_"], "data": {"train_batch_size": 32}}))
    return conf


@pytest.mark.parametrize("path_flag", [["--config-path", "conf"], ["-cp=ABS"]])
def test_a_user_yaml_extends_a_bundled_config_through_its_defaults(tmp_path, user_configs, path_flag):
    flags = [f.replace("ABS", str(user_configs)) for f in path_flag]  # relative: from the current folder
    cfg = composed(*flags, "--config-name", "mine", cwd=tmp_path)
    assert cfg["data"]["train_batch_size"] == 32
    assert cfg["actor_rollout_ref"]["actor"]["strategy"] == "megatron"
    assert cfg["actor_rollout_ref"]["rollout"]["name"] == "sglang"


def test_a_user_config_with_a_bundled_name_wins_over_ours(tmp_path, user_configs):
    (user_configs / "ppo_megatron_trainer.yaml").write_text(yaml.safe_dump({
        "defaults": ["dapo_trainer", "_self_"], "trainer": {"experiment_name": "mine"}}))
    for name in ("ppo_megatron_trainer", "mine"):  # directly, and through mine.yaml's defaults
        cfg = composed(f"--config-path={user_configs}", f"--config-name={name}", cwd=tmp_path)
        assert cfg["trainer"]["experiment_name"] == "mine"
        assert cfg["actor_rollout_ref"]["actor"]["strategy"] == "torch"


def test_hydra_run_dir_is_honoured(tmp_path):
    shown = composed("--cfg", "hydra", "hydra.run.dir=elsewhere", cwd=tmp_path)
    assert shown["hydra"]["run"]["dir"] == "elsewhere"
    assert composed("--cfg", "hydra", cwd=tmp_path)["hydra"]["run"]["dir"] == "${trainer.log_dir}"
    # a run that Hydra starts (and that our checks then stop) writes its .hydra/ folder there
    result = dapo("hydra.run.dir=rd", ARR + "rollout.n=0", cwd=tmp_path)
    assert result.returncode == 2
    assert yaml.safe_load((tmp_path / "rd" / ".hydra" / "overrides.yaml").read_text()) == [ARR + "rollout.n=0"]


def test_verl_mtp_dapo_forwards_argv_unchanged(tmp_path, user_configs):
    args = ["--cfg", "job", "--config-path", "conf", "-cn", "mine", "data.train_batch_size=24"]
    via_cli = dapo("dapo", *args, cwd=tmp_path, module="verl_mtp.cli")
    assert via_cli.returncode == 0, via_cli.stderr
    assert via_cli.stdout == dapo(*args, cwd=tmp_path).stdout
    assert yaml.safe_load(via_cli.stdout)["data"]["train_batch_size"] == 24


def test_help_is_hydras_with_ours_on_top(tmp_path):
    result = dapo("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DAPO / GRPO with joint MTP training") and "Powered by Hydra" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["data.bogus=1"], "unknown config key 'data.bogus'"),
    (["--cfg", "job", "data.train_batch_size=x"], "key 'data.train_batch_size': expected int, got 'x'"),
    (["data.x=["], "key 'data.x': cannot parse override"),
    ([ARR + "rollout.n=0"], f"key '{ARR}rollout.n': must be >= 1, got 0"),
    (["--config-name", "nope"], "Cannot find primary config 'nope'"),
    (["--multirun", "data.train_batch_size=8,16"], "--multirun is not supported"),
    (["hydra.mode=MULTIRUN"], "--multirun is not supported"),
    ([ARR + "rollout.name=sglang", "trainer.device=cuda", ARR + "model.path=/m"],
     f"key '{ARR}rollout.mode': rollout.name=sglang runs as HTTP server replicas here"),
    ([ARR + "rollout.name=vllm"], f"key '{ARR}rollout.name': 'vllm' is not implemented"),
    ([ARR + "rollout.mode=async"], f"key '{ARR}rollout.mode': 'async' is not implemented"),
    (["data.train_files=train.jsonl"], f"key '{ARR}model.path': own data (data.train_files) needs a model path"),
    (["data.reward_fn_key=answer"], "key 'data.reward_fn_key': 'answer' is not implemented"),
])
def test_errors_are_one_line_with_status_2(tmp_path, args, message):
    result = dapo(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"verl-mtp dapo: {result.stderr.strip().split(': ', 1)[1]}"
    assert "\n" not in result.stderr.strip() and message in result.stderr, result.stderr


def test_a_bad_data_row_is_one_line_after_the_ignored_key_warnings(tmp_path):
    good = {"prompt": [{"role": "user", "content": "1+1?"}], "data_source": "math",
            "reward_model": {"ground_truth": "2"}}
    bad = {**good, "prompt": "1+1?"}
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in (good, bad)) + "\n")
    result = dapo("data.train_files=train.jsonl", ARR + "model.tokenizer_path=unused", "trainer.balance_batch=true",
                  cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "warning: key 'trainer.balance_batch'=True is ignored: responses are not reordered across ranks by token "
        "count; same result, ranks may wait on each other",
        "verl-mtp dapo: train.jsonl: row 1: field 'prompt': must be a list of chat messages, got str",
    ]


def test_the_quickstarts_rl_overrides_get_the_same_start_checks(tmp_path):
    result = dapo("quickstart", "--out", "qs", "data.reward_fn_key=foo", cwd=tmp_path, module="verl_mtp.cli")
    assert result.returncode == 1 and not (tmp_path / "qs").exists()  # its argument errors exit 1
    assert result.stderr.strip() == ("verl-mtp quickstart: error: key 'data.reward_fn_key': 'foo' is not implemented "
                                     "(the data_source column picks the grader); remove it or set 'data_source'")
