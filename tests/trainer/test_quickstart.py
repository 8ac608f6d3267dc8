"""`verl-mtp quickstart` end to end with tiny stage lengths: every stage runs, the report is written,
and a second invocation resumes (skips finished stages) instead of redoing them."""

import json
import os
import shlex
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_mtp.config import load_config
from verl_mtp.trainer import main_dapo, quickstart, sft

FAST = ["--sft-steps", "12", "--rl-steps", "2", "--eval-limit", "8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=2",
        "data.train_batch_size=4", "data.gen_batch_size=4", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "algorithm.filter_groups.enable=false", "data.max_response_length=32",
        "reward_model.overlong_buffer.len=8"]


@pytest.mark.parametrize("argv,needle", [
    (["--rl-steps", "0"], "--rl-steps must be >= 1"),
    (["--eval-limit", "0"], "--eval-limit must be >= 1"),
    (["--teacher-slip", "1.5"], "--teacher-slip must be in [0, 1], got 1.5"),
    (["noequals"], "RL override 'noequals' is not KEY=VALUE"),
    (["actor_rollout_ref.actor.optim.lrx=1"], "unknown config key 'actor_rollout_ref.actor.optim.lrx'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, argv, needle):
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "run"), *argv])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_run_folder_is_not_continued_with_other_data(tmp_path):
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / "DONE").write_text(json.dumps({"seed": 0, "teacher_slip": 0.5, "trace_forms": "fixed"}))
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "run"), "--teacher-slip", "0"])
    assert ("data was made with {'seed': 0, 'teacher_slip': 0.5, 'trace_forms': 'fixed'}, not "
            "{'seed': 0, 'teacher_slip': 0.0, 'trace_forms': 'fixed'}") in str(e.value)
    assert "use --fresh or another --out" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "tokenizer").exists()  # it stopped before the first stage
    with pytest.raises(SystemExit) as e:  # the shift scenario's SFT corpus has both trace layouts
        quickstart.main(["--out", str(tmp_path / "run"), "--scenario", "shift"])
    assert "not {'seed': 0, 'teacher_slip': 0.5, 'trace_forms': 'mixed'}" in str(e.value)
    (data / "DONE").write_text("ok")  # a folder from before the options were recorded: a perfect teacher's data
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "run")])
    assert ("data was made with {'seed': 0, 'teacher_slip': 0.0, 'trace_forms': 'fixed'}, not "
            "{'seed': 0, 'teacher_slip': 0.5, 'trace_forms': 'fixed'}") in str(e.value)


def test_a_finished_sft_is_not_reused_for_other_steps(tmp_path):
    run = tmp_path / "run"
    for stage, done in (("data", {"seed": 0, "teacher_slip": 0.5, "trace_forms": "fixed"}), ("sft", {"steps": 4000})):
        (run / stage).mkdir(parents=True)
        (run / stage / "DONE").write_text(json.dumps(done))
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(run), "--sft-steps", "12"])
    assert f"{run / 'sft'} was made with {{'steps': 4000}}, not {{'steps': 12}}: use --fresh or another --out" \
        in str(e.value)
    assert (run / "tokenizer" / "tokenizer.json").read_text() == "{}"  # a tokenizer from before DONE: kept
    (run / "data" / "DONE").write_text(json.dumps({"seed": 0, "teacher_slip": 0.5, "trace_forms": "mixed"}))
    with pytest.raises(SystemExit) as e:  # the shift scenario's tokenizer writes spaces as tokens of their own
        quickstart.main(["--out", str(run), "--scenario", "shift"])
    assert (f"{run / 'tokenizer'} was made with {{'isolate_spaces': False}}, not {{'isolate_spaces': True}}"
            in str(e.value))


def test_dynamic_sampling_giving_up_is_one_line(tmp_path, monkeypatch):
    """An outcome of data and policy, not a crash: the quickstart (and `verl-mtp dapo`, through
    main_dapo.USER_ERRORS) report it in one line naming the key. Seen in a fresh venv: 12 SFT steps leave a
    policy every group of which scores the same."""
    from verl_mtp.algos.dynamic_sampling import DynamicSamplingState, FilterGroupsExhausted, accumulate_groups
    from verl_mtp.trainer import main_dapo

    def give_up(*args, **kwargs):
        accumulate_groups(DynamicSamplingState(), [0, 0], [False, False], 2, max_num_gen_batches=1)

    for stage in ("stage_data", "stage_tokenizer", "stage_sft", "stage_warmup"):  # as if finished
        monkeypatch.setattr(quickstart, stage, lambda *a, **k: tmp_path)
    monkeypatch.setattr(quickstart, "stage_rl", give_up)
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "run"), "--no-control", *FAST])
    assert "algorithm.filter_groups.max_num_gen_batches=1" in str(e.value) and "\n" not in str(e.value)
    assert FilterGroupsExhausted in main_dapo.USER_ERRORS


def test_whole_pipeline_then_resume(ray_local, tmp_path, capsys):
    """In process; the control run (rl_control) is the recipe's end-to-end test below."""
    run = tmp_path / "qs"
    assert quickstart.main(["--out", str(run), "--no-control", *FAST]) == 0
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary["models"]) == {"sft", "rl"}
    for result in summary["models"].values():
        assert 0.0 <= result["acc/greedy"] <= 1.0 and result["accept_length/sampled"] >= 1.0
        assert result["tokens_per_s/plain"] > 0
    for png in summary["plots"].values():
        assert (run / "report" / png).stat().st_size > 1000
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "timing_s/step" in r]
    assert len(steps) == 2 and all("rollout/accept_length" in r and "mtp/loss_1" in r for r in steps)
    assert list((run / "rl" / "tensorboard").glob("events.out.tfevents.*"))  # inside the run folder
    assert "wall time" in (run / "report" / "summary.md").read_text()
    assert "TENSORBOARD_DIR" not in os.environ  # restored for whatever runs next in this process
    capsys.readouterr()

    start = time.perf_counter()
    assert quickstart.main(["--out", str(run), "--no-control", *FAST]) == 0  # every stage is done: the eval reruns
    out = capsys.readouterr().out
    assert "stage 1/6" not in out and "stage 3/6" not in out and "stage 4/6" not in out
    assert "stage 6/6" in out and time.perf_counter() - start < 60


RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart_cpu.sh"


def recipe(run, *args, dry=True, **env):
    # `verl-mtp` is where this interpreter's pip put it, whether or not that folder is on PATH
    scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    path = os.pathsep.join([*scripts, os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RUN": str(run), "DRY_RUN": str(int(dry)), **env}
    return subprocess.run(["bash", str(RECIPE), *args], env=env, capture_output=True, text=True, timeout=600,
                          check=True)


def test_recipe_runs_the_quickstarts_stages_with_its_settings(tmp_path):
    run = tmp_path / "run"
    commands = [shlex.split(line) for line in recipe(run, "actor_rollout_ref.actor.optim.lr=1e-4").stdout.splitlines()]
    assert [c[:2] for c in commands] == [["verl-mtp", s] for s in ("data", "tokenizer", "sft", "dapo", "dapo", "eval")]
    data = commands[0]
    for flag, value in quickstart.DATA_SIZES.items():
        assert data[data.index("--" + flag.replace("_", "-")) + 1] == str(value)
    assert data[data.index("--teacher-slip") + 1] == "0.5"
    sft_args = sft.build_parser().parse_args(commands[2][2:])
    assert sft_args.steps == sft.SFTConfig().steps and sft_args.out == str(run / "sft")
    for command, name, train in zip(commands[3:5], ("rl", "rl_control"), (True, False)):
        config_name, args = main_dapo.parse(command[2:])
        want = quickstart.rl_overrides(run / name, run / "sft", run / "data", 40, train, 0,
                                       ["actor_rollout_ref.actor.optim.lr=1e-4"])
        assert OmegaConf.to_container(load_config(args, config_name=config_name)) == \
            OmegaConf.to_container(load_config(want, config_name=quickstart.RL_CONFIG))


def test_recipe_end_to_end_then_resume(tmp_path):
    run = tmp_path / "run"
    fast = [o for o in FAST if "=" in o] + ["+ray_kwargs.ray_init.address=local"]  # its own Ray, not the tests'
    env = dict(SFT_STEPS="12", RL_STEPS="1", EVAL_LIMIT="8")
    recipe(run, *fast, dry=False, **env)
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary["models"]) == {"sft", "rl", "rl_control"}
    assert {"rollout/accept_length", "critic/acc/mean"} <= set(summary["plots"])
    for name in ("rl", "rl_control"):
        assert (run / name / "ckpt" / "global_step_1" / "actor" / "model.safetensors").exists()
        assert list((run / name / "tensorboard").glob("events.out.tfevents.*"))
        steps = [r for r in map(json.loads, (run / name / "metrics.jsonl").read_text().splitlines())
                 if "timing_s/step" in r]
        assert len(steps) == 1 and all("rollout/accept_length" in r for r in steps)
        assert any("mtp/loss_1" in r for r in steps) == (name == "rl")  # the control does not train the heads
    # every stage is done: a dry run of the same command lists only the eval, which always runs again
    again = [shlex.split(line)[:2] for line in recipe(run, *fast, dry=True, **env).stdout.splitlines()]
    assert again == [["verl-mtp", "eval"]]


def test_eval_cli_names_the_bad_argument(tmp_path):
    from verl_mtp.trainer import evaluate

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "t.parquet").write_text("")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    base = ["--tokenizer", str(tmp_path / "tok"), "--test", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "r")]
    for args, needle in ((["sft"], "model 'sft' is not NAME=DIR"),
                         ([f"sft={tmp_path}"], f"model sft: {tmp_path} has no config.json"),
                         (["--run", f"rl={tmp_path}", f"sft={tmp_path / 'm'}"],
                          f"--run rl: {tmp_path} has no metrics.jsonl"),
                         (["--limit", "0", "a=b"], "--limit must be >= 1")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(base + args)
        assert needle in str(e.value) and "\n" not in str(e.value)
