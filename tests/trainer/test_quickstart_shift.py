"""`verl-mtp quickstart --scenario shift`: one RL run per MTP arm under a reward that moves the policy,
from the same SFT model, and the shift report; tiny stage lengths (the real run is docs/benchmarks.md's)."""

import json

import pytest

from tests.trainer.test_quickstart import FAST
from verl_mtp.config import load_config
from verl_mtp.trainer import quickstart


def test_arms_and_scenario_overrides_reach_the_config(tmp_path):
    """What the scenario and each arm change arrives in the RL run's config, after the quickstart's own
    overrides and before the user's (which win)."""
    base = load_config([], config_name=quickstart.RL_CONFIG).actor_rollout_ref.actor.optim.lr
    for arm in quickstart.ARMS:
        extra = [*quickstart.SCENARIOS["shift"]["overrides"], *quickstart.arm_overrides(arm)]
        cfg = load_config(quickstart.rl_overrides(tmp_path, tmp_path, tmp_path, 40, arm != "frozen", 0, extra),
                          config_name=quickstart.RL_CONFIG)
        assert cfg.actor_rollout_ref.actor.optim.lr == 4 * base  # the scenario: 4x the quickstart's lr
        # a format reward for compact traces; dynamic sampling keeps groups whose answers differ only in layout
        assert cfg.custom_reward_function.name == "tidy_compute_score"
        assert cfg.custom_reward_function.reward_kwargs == {"weight": 3.0}
        assert cfg.actor_rollout_ref.model.mtp.mtp_loss_scaling_factor == 1.0
        assert cfg.actor_rollout_ref.model.mtp.lr_scale == 4.0  # the draft keeps up with the moving policy
        assert cfg.algorithm.filter_groups.metric == "seq_final_reward"
        assert cfg.actor_rollout_ref.model.mtp.enable_train == (arm != "frozen")
        assert cfg.actor_rollout_ref.model.mtp.loss_type == ("ce" if arm == "frozen" else arm)  # frozen: the default
    user = load_config(quickstart.rl_overrides(tmp_path, tmp_path, tmp_path, 40, True, 0,
                                               [*quickstart.SCENARIOS["shift"]["overrides"],
                                                "actor_rollout_ref.actor.optim.lr=1e-5"]),
                       config_name=quickstart.RL_CONFIG)
    assert user.actor_rollout_ref.actor.optim.lr == 1e-5


def test_targets_are_pass_or_miss_rows():
    lines = quickstart.target_lines({"frozen": 0.84, "ce": 0.97, "tv": 0.94}, {"frozen": 0.7, "ce": 0.6, "tv": 0.5},
                                    base_acc=0.629)
    assert "| PASS | frozen draft keeps <= 0.85 of its post-SFT accept length: 0.840 |" in lines
    assert "| PASS | ce draft keeps >= 0.95: 0.970 |" in lines and "| MISS | tv draft keeps >= 0.95: 0.940 |" in lines
    assert "| MISS | best new objective (tv: kept 0.940) at least as good as ce (kept 0.970) |" in lines
    assert lines[-1] == "| MISS | held-out greedy accuracy of the RL arms, mean 0.600 (range 0.500-0.700) >= post-SFT 0.629 |"
    lines = quickstart.target_lines({"frozen": 0.9, "ce": 0.96, "soft_ce": 0.98, "tv": 0.97},
                                    {"frozen": 0.7, "ce": 0.7, "soft_ce": 0.6, "tv": 0.6}, base_acc=0.629)
    assert lines[2].startswith("| MISS | frozen") and lines[-1].startswith("| PASS | held-out greedy accuracy")
    assert "| PASS | best new objective (soft_ce: kept 0.980) at least as good as ce (kept 0.960) |" in lines


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
    speeds = {"sft": quickstart.rollout_speed(sft, sft, data / "test.parquet", limit=4, repeats=1)}
    assert speeds["sft"]["plain"] > 0 and speeds["sft"]["speculative_2"] > 0
    report = "\n".join(quickstart.shift_lines(summary, run, speeds))
    assert "| post-SFT |" in report and "| tv |" in report and "| tv draft keeps >= 0.95:" in report
    assert f"| {speeds['sft']['plain']:.0f} | {speeds['sft']['speculative_2']:.0f} |" in report
    quickstart.plot_shift(run, ["shift_tv"])
    assert (run / "report" / "shift_accept_length.png").exists()
