"""Package-level promises: a light import, and a CLI that lists its commands."""

import subprocess
import sys


def test_import_does_not_load_ray_megatron_or_sglang():
    code = ("import sys, verl_mtp, verl_mtp.models, verl_mtp.rollout, verl_mtp.algos, verl_mtp.config; "
            "heavy = [m for m in ('ray', 'megatron', 'sglang') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "verl_mtp.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("dapo", "quickstart", "sft", "mtp-warmup", "dpo", "generate", "eval", "report"):
        assert f"  {command} " in out
    bad = subprocess.run([sys.executable, "-m", "verl_mtp.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
