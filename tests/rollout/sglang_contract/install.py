"""Real SGLang releases for the contract tests, installed once per version with `pip install --no-deps
--target` into a cache folder ($VERL_MTP_TEST_CACHE, default ~/.cache/verl_mtp_test), beside the few
pure-Python packages its request and argument modules import (DEPS). Releases cannot coexist in one
interpreter, so each is used from a subprocess with its folder on PYTHONPATH (worker.py)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

# imported by sglang's io_struct / server_args chain and absent from verl_mtp's own environment
DEPS = ("pybase64", "psutil", "pyzmq", "msgspec", "openai==2.6.1", "jiter", "distro", "dill", "partial_json_parser",
        "compressed-tensors", "loguru", "sentencepiece")
WORKER = Path(__file__).with_name("worker.py")
REPORT_MARK = "CONTRACT-REPORT "


class Unavailable(Exception):
    """The release could not be installed here (no index, no network): the tests skip with this reason."""


def cache_root() -> Path:
    return Path(os.environ.get("VERL_MTP_TEST_CACHE") or Path.home() / ".cache" / "verl_mtp_test")


@contextmanager
def _locked(path: Path):
    """One installer at a time per folder (parallel test processes share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pip_target(folder: Path, packages: tuple[str, ...]) -> Path:
    done = folder / ".installed"
    with _locked(folder):
        if done.exists() and done.read_text() == json.dumps(packages):
            return folder
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
               "--target", str(folder), "--upgrade", *packages]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise Unavailable(f"pip could not install {' '.join(packages)} into {folder}: {tail[0]}")
        done.write_text(json.dumps(packages))
    return folder


def sglang_path(version: str) -> str:
    """PYTHONPATH entries of one release (installed on first use)."""
    root = cache_root()
    release = _pip_target(root / f"sglang-{version}", (f"sglang=={version}",))
    deps = _pip_target(root / "deps", DEPS)
    return os.pathsep.join([str(release), str(deps)])


def start_worker(version: str, spec: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": sglang_path(version), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    return proc


def read_report(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(timeout)
    lines = [line for line in out.splitlines() if line.startswith(REPORT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"contract worker failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1][len(REPORT_MARK):])
