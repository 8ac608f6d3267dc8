"""The rollout benchmark runs end to end (quick settings) and its arms decode the same tokens.

Speeds are not asserted here (they live in the script's output and docs/benchmarks.md); what is
asserted is that every arm, transformers' `generate` included, produced exactly (b)'s greedy tokens,
so the script compares equal work, and that its report carries every table the docs quote."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "rollout.py"


def test_quick_rollout_bench_arms_agree_and_report_is_complete(tmp_path):
    out = tmp_path / "rollout.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--threads", "1",
                          "--deep-depth", "3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    arms = {(r["batch"], r["arm"]) for r in result["rows"]}
    for batch in (1, 8, 64):
        assert {(batch, a) for a in ("hf", "plain", "spec_2", "spec_3", "auto")} <= arms
    assert (1, "hf_assisted") in arms
    assert all(r["same_tokens_as_plain"] == 1.0 for r in result["rows"] if r["arm"] != "plain_bf16")
    spec = {r["arm"]: r["accept_length"] for r in result["rows"] if r["batch"] == 1}
    assert spec["plain"] == 1.0 and spec["spec_3"] > spec["spec_2"] > 1.5  # deeper drafting kept more per pass
    floors = {f["batch"]: f for f in result["decode_floor"]}
    assert set(floors) == {1, 8, 64} and all(f["gemm_ms_per_step"] > 0 and f["max_plain_vs_hf"] > 0
                                             for f in floors.values())
    names = [t["target"] for t in result["targets"]]
    assert names.count("(b) >= 3x (a)") == 2 and names.count("(d) >= 0.97x (b)") == 3
    assert names.count("(d) auto >= 0.95x best fixed depth") == 3
    assert {"(b) step <= 1.5x its floor", "(b) step <= 2.0x its floor"} <= set(names)
    assert {"(c) depth 2 >= 1.8x (b) if accept >= 2.5", "(c) depth 3 >= 1.8x (b) if accept >= 2.5"} <= set(names)
    assert "| batch | (a) ms/step |" in run.stdout and "| target |" in run.stdout
