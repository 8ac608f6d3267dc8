"""One rollout replica seen from the trainer: a JSON-over-HTTP client, its errors, and starting replica
processes (ours or SGLang's) and waiting until they answer /health. The bottom of the rollout client stack:
client.py, sglang.py and ray_launch.py build on it, it imports none of them.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from verl_mtp.rollout.protocol import generate_body
from verl_mtp.rollout.sampling import SamplingParams

# a replica that cannot answer within this long is treated as gone; generation of long responses on
# GPUs takes minutes, so this is generous by design and configurable per ServerRollout
DEFAULT_TIMEOUT_S = 1800.0


class ReplicaError(RuntimeError):
    """A rollout replica failed or refused a request; the message names its URL."""


class ReplicaUnreachable(ReplicaError):
    """The replica did not answer at all (refused, reset, timed out): its process is likely gone, which
    the driver may treat like a dead worker. Refusals (HTTP errors) are plain ReplicaErrors: bugs."""


class ReplicaClient:
    """Blocking JSON-over-HTTP calls to one replica. Proxies are ignored: replicas are local or in-cluster."""

    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._server_info: dict | None = None

    def server_info(self) -> dict:
        """GET /server_info (SGLang: its version and ServerArgs), asked once and kept until the replica
        stops answering (a replica that comes back may be another version or another launch)."""
        if self._server_info is None:
            self._server_info = self.request("GET", "/server_info")
        return self._server_info

    def request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                raw, kind = resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise ReplicaError(f"rollout server {self.url}: {method} {path} failed with HTTP {e.code}: "
                               f"{_error_message(e.read())}") from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, closed mid-answer
            self._server_info = None
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise ReplicaUnreachable(f"rollout server {self.url} did not answer {method} {path} ({reason}); "
                                     "is the replica still running?") from None
        return json.loads(raw) if "json" in kind else raw.decode()

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            self.request("GET", "/health", timeout=timeout)
            return True
        except ReplicaError:
            return False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[dict]:
        items = self.request("POST", "/generate", generate_body(prompts, params))
        expected = len(prompts) * params.n
        if not isinstance(items, list) or len(items) != expected:
            got = len(items) if isinstance(items, list) else type(items).__name__
            raise ReplicaError(f"rollout server {self.url}: /generate returned {got} samples, expected {expected}")
        return items


def _error_message(raw: bytes) -> str:
    """SGLang answers {"error": {"message"}} from /generate, {"success": false, "message"} from its
    weight endpoints and FastAPI's {"detail": [...]} to a body that fails validation (422); anything else
    is shown as it came."""
    try:
        body = json.loads(raw)
        if "detail" in body:
            return "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in body["detail"])
        return body["error"]["message"] if "error" in body else body["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip() or "(no message)"


# ---- launching replicas ------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def native_server_command(model_path: str, host: str, port: int, port_file: str, server_args=()) -> list[str]:
    return [sys.executable, "-m", "verl_mtp.rollout.server", "--model-path", str(model_path), "--host", host,
            "--port", str(port), "--port-file", port_file, *map(str, server_args)]


def native_server_args(cfg) -> list[str]:
    """Our config -> `python -m verl_mtp.rollout.server` flags (SGLang's names, as sglang_server_args)."""
    arr = cfg.actor_rollout_ref
    r, mtp = arr.rollout, arr.model.mtp
    args = ["--context-length", r.max_model_len or cfg.data.max_prompt_length + cfg.data.max_response_length,
            "--max-running-requests", r.max_batch_size, "--random-seed", cfg.trainer.seed,
            "--load-format", "dummy" if r.load_format == "dummy" else "auto", "--dtype", r.dtype]
    if mtp.enable and mtp.enable_rollout:
        args += ["--speculative-algorithm", mtp.speculative_algorithm, "--speculative-num-steps",
                 mtp.speculative_num_steps, "--speculative-eagle-topk", mtp.speculative_eagle_topk]
        if mtp.speculative_num_draft_tokens is not None:
            args += ["--speculative-num-draft-tokens", mtp.speculative_num_draft_tokens]
    return [str(a) for a in args]


def launch_replicas(commands: list[list[str]], host: str, ports: list[int], log_dir: str | None = None,
                    startup_timeout: float = 300.0, env: dict[str, str] | None = None) -> list[ServerProcess]:
    """Start every command at once, then wait for each /health. Port 0 means the server picks one and
    writes it to the --port-file given in its command (`native_server_command` does). `env` adds to (or
    overrides) this process's environment, e.g. the CUDA_VISIBLE_DEVICES of a colocated replica. On
    failure all replicas are stopped and the error names the one that failed, with the end of its log."""
    folder = Path(log_dir or tempfile.mkdtemp(prefix="verl_mtp_rollout_"))
    folder.mkdir(parents=True, exist_ok=True)
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    started = []
    for i, cmd in enumerate(commands):
        log = folder / f"replica{i}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        started.append((proc, log, _port_file(cmd)))
    ready = []
    try:
        deadline = time.monotonic() + startup_timeout
        for (proc, log, port_file), port in zip(started, ports):
            ready.append(_wait_ready(proc, log, host, port, port_file, deadline))
    except BaseException:
        for proc, log, _ in started:
            ServerProcess("", proc, log).stop()
        raise
    return ready


def _port_file(cmd: list[str]) -> str | None:
    return cmd[cmd.index("--port-file") + 1] if "--port-file" in cmd else None


def _wait_ready(proc, log: Path, host: str, port: int, port_file: str | None, deadline: float) -> ServerProcess:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise ReplicaError(f"rollout server {host}:{port or '?'} exited with code {proc.returncode} during "
                               f"startup; end of {log}:\n{tail}")
        if not port and port_file and os.path.exists(port_file):
            port = int(Path(port_file).read_text())
        if port and ReplicaClient(f"http://{host}:{port}").healthy(timeout=1.0):
            return ServerProcess(f"http://{host}:{port}", proc, log)
        time.sleep(0.1)
    raise ReplicaError(f"rollout server {host}:{port or '?'} not healthy within the startup timeout; see {log}")


