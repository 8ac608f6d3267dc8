"""`verl-mtp quickstart --scenario shift`: one RL run per MTP arm under a reward that moves the policy,
from the same SFT model, and the shift report; tiny stage lengths (the real run is docs/benchmarks.md's)."""

import json

import pytest

from tests.trainer.test_quickstart import FAST
from verl_mtp.config import load_config
from verl_mtp.trainer import quickstart


def test_arms_and_scenario_overrides_parse():
    for arm in quickstart.ARMS:
        cfg = load_config([*quickstart.SCENARIOS["shift"], *quickstart.arm_overrides(arm)],
                          config_name=quickstart.RL_CONFIG)
        assert cfg.reward_model.overlong_buffer.len == 48 and cfg.reward_model.overlong_buffer.enable
        assert cfg.actor_rollout_ref.model.mtp.loss_type == ("ce" if arm == "frozen" else arm)


@pytest.mark.parametrize("arms", ["frozen,kl", "ce,ce"])
def test_bad_arms_are_one_line_errors(tmp_path, arms):
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--out", str(tmp_path / "run"), "--scenario", "shift", "--arms", arms])
    assert f"--arms '{arms}': expected distinct arms from frozen,ce,soft_ce,tv" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_shift_scenario_runs_an_arm_and_reports(ray_local, tmp_path):
    """The scenario's stages on a tiny SFT model and task (the quickstart's own data and tokenizer stages
    are the default pipeline's test); one arm keeps the suite short (the frozen arm is the default
    scenario's control run, tested there)."""
    from verl_mtp.data.synthetic_math import write_rl_dataset
    from verl_mtp.trainer.sft import SFTConfig, train_sft

    run, data = tmp_path / "qs", tmp_path / "qs" / "data"
    write_rl_dataset(str(data), n_train=64, n_test=8, seed=0, levels=(1,), n_sft=240)
    sft = run / "sft"
    train_sft(SFTConfig(data=str(data / "sft.jsonl"), out=str(sft), test_data=None, hidden=32, layers=2, heads=4,
                        kv_heads=2, intermediate=64, steps=12, batch_size=16, lr=1e-2, warmup=2, val_size=0),
              progress=False)
    models = {"sft": sft, **quickstart.stage_shift(run, sft, data, 2, 0, ["tv"], FAST[6:])}
    summary = quickstart.stage_eval(run, sft, data, models, started=0.0, limit=8)
    assert set(summary["models"]) == {"sft", "shift_tv"}
    rows = [json.loads(line) for line in (run / "shift_tv" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "timing_s/step" in r]
    assert len(steps) == 2 and all("mtp/expected_accept_rate_1" in r and "mtp/loss_1" in r for r in steps)
    report = "\n".join(quickstart.shift_lines(summary, run))
    assert "| post-SFT |" in report and "| tv |" in report and "trained drafts keep tv" in report
