"""The native engine as an HTTP rollout server speaking the SGLang subset the trainer uses.

    python -m verl_mtp.rollout.server --model-path DIR [--port 30000] \
        [--speculative-algorithm EAGLE --speculative-num-steps 2] [--load-format dummy]

Endpoints (SGLang's names and shapes, see protocol.py): POST /generate, POST /update_weights_from_tensor,
POST /init_weights_update_group, POST /update_weights_from_distributed, GET|POST /flush_cache,
POST /pause_generation, POST /continue_generation, POST /release_memory_occupation,
POST /resume_memory_occupation, POST /update_weight_version, GET /model_info, GET /weight_version,
GET /server_info, GET /health, the deprecated GET /get_model_info and /get_server_info, and, when the
emulated version has them, POST /begin_weight_update and /end_weight_update.
It emulates the protocol of one supported SGLang version (--sglang-version, reported in /server_info) at
least as strictly as that version: a POST whose SGLang route declares a body is refused without one
(422, as FastAPI does), body fields that version's request class lacks are refused (SGLang ignores
them silently, which is how an invented field once went unnoticed), an update outside a weight-update
session is refused where the version requires one (0.5.23), and on 0.5.6 an update's weight_version is
dropped while generation is paused, as SGLang 0.5.6 does.
Binds 127.0.0.1 unless --host says otherwise: the weight endpoints rewrite the model, so exposing them is
an explicit choice. Requests run one engine call at a time (the engine batches within a call); /health
answers even while a batch runs. The distributed weight path joins the trainer's group with gloo (this
server is one CPU process: rank = rank_offset); SGLang does the same on GPUs with NCCL.
Memory release/resume (colocated server mode: the actor trains on the same devices meanwhile) frees
nothing on CPU, but is tracked as SGLang would act on it: /generate is refused while any memory is
released, weight updates while the weights are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import traceback
import uuid
from collections import deque
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from verl_mtp.device import DTYPES
from verl_mtp.models import MTPCausalLM, read_config
from verl_mtp.rollout.engine import NativeEngine
from verl_mtp.rollout.protocol import (TENSOR_LOAD_FORMAT, ProtocolError, batch_sampling_params, decode_tensors,
                                       prompts_from_request, sample_to_json)
from verl_mtp.rollout.sglang import DEFAULT_SGLANG_VERSION, MEMORY_TAGS, MTP_MARK, WEIGHT_GROUP_NAME, sglang_version
from verl_mtp.rollout.weight_group import join_weight_group, leave_weight_group, receive_tensors


class Unavailable(RuntimeError):
    """The server cannot take the request now (generation paused too long); HTTP 503."""


class MissingBody(ProtocolError):
    """A POST without the body its SGLang route declares; HTTP 422, FastAPI's 'Field required'."""


_BASE = {"rid", "http_worker_ipc"}  # every SGLang request class has them
_UPDATE = _BASE | {"flush_cache", "abort_all_requests", "weight_version", "load_format"}
# fields of SGLang's request class per endpoint (io_struct.py); 0.5.23 adds the ones in _NEW_FIELDS
_FIELDS = {
    "/update_weights_from_tensor": _UPDATE | {"serialized_named_tensors"},
    "/update_weights_from_distributed": _UPDATE | {"names", "dtypes", "shapes", "group_name"},
    "/init_weights_update_group": _BASE | {"master_address", "master_port", "rank_offset", "world_size", "group_name",
                                           "backend"},
    "/pause_generation": _BASE | {"mode"}, "/continue_generation": _BASE,
    "/release_memory_occupation": _BASE | {"tags"}, "/resume_memory_occupation": _BASE | {"tags"},
    "/update_weight_version": _BASE | {"new_version", "abort_all_requests"},
    "/begin_weight_update": _BASE | {"selector"}, "/end_weight_update": _BASE,
}
_NEW_FIELDS = {"/update_weights_from_tensor": {"selector", "torch_empty_cache"},
               "/update_weights_from_distributed": {"selector", "torch_empty_cache"},
               "/continue_generation": {"torch_empty_cache"}}
SELECTORS = ("target", "draft", "all")


class RolloutServer:
    """Routes SGLang-shaped requests to one NativeEngine. `speculative` says whether the engine drafts,
    which decides (as in SGLang) whether responses carry spec_* counters."""

    def __init__(self, engine: NativeEngine, model_path: str, host: str = "127.0.0.1", port: int = 0,
                 weight_version: str = "default", speculative: bool = False, pause_timeout: float = 600.0,
                 sglang: str = DEFAULT_SGLANG_VERSION):
        self.engine = engine
        self.protocol = sglang_version(sglang)
        self.session: str | None = None  # selector of the open weight-update session (update_session versions)
        self.model_path = model_path
        self.weight_version = weight_version
        self.speculative = speculative
        self.pause_timeout = pause_timeout
        self.counters = {"generate_requests": 0, "weight_updates": 0, "cache_flushes": 0,
                         "tensors_received_by_broadcast": 0, "memory_releases": 0, "memory_resumes": 0}
        self.released: set[str] = set()  # memory tags released (SGLang's "weights", "kv_cache", "cuda_graph")
        # the order of generate / release / resume / weight-update calls, for whoever checks the sequencing
        self.recent_events: deque[str] = deque(maxlen=256)
        self.weight_groups: dict[str, dict] = {}  # group_name -> {"group", "rank", "world_size", "backend"}
        self._receive_lock = threading.Lock()  # one broadcast at a time: ranks must post receives in order
        self._engine_lock = threading.Lock()  # engine calls never interleave
        self._gate = threading.Condition()  # pause/continue bookkeeping
        self._paused = False
        self._active = 0
        self._routes = {
            ("GET", "/health"): self.health, ("GET", "/health_generate"): self.health,
            ("GET", "/get_model_info"): self.model_info, ("GET", "/get_server_info"): self.server_info,
            ("GET", "/model_info"): self.model_info, ("GET", "/server_info"): self.server_info,
            ("GET", "/weight_version"): self.get_weight_version,
            ("POST", "/update_weight_version"): self.update_weight_version,
            ("POST", "/generate"): self.generate,
            ("POST", "/update_weights_from_tensor"): self.update_weights_from_tensor,
            ("GET", "/flush_cache"): self.flush_cache, ("POST", "/flush_cache"): self.flush_cache,
            ("POST", "/pause_generation"): self.pause_generation,
            ("POST", "/continue_generation"): self.continue_generation,
            ("POST", "/init_weights_update_group"): self.init_weights_update_group,
            ("POST", "/update_weights_from_distributed"): self.update_weights_from_distributed,
            ("GET", "/release_memory_occupation"): self.release_memory_occupation,
            ("POST", "/release_memory_occupation"): self.release_memory_occupation,
            ("GET", "/resume_memory_occupation"): self.resume_memory_occupation,
            ("POST", "/resume_memory_occupation"): self.resume_memory_occupation,
        }
        if self.protocol.update_session:
            self._routes[("POST", "/begin_weight_update")] = self.begin_weight_update
            self._routes[("POST", "/end_weight_update")] = self.end_weight_update
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RolloutServer":
        """Serve from a background thread (in-process use, e.g. tests)."""
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="rollout-server",
                         daemon=True).start()
        return self

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for name in list(self.weight_groups):
            leave_weight_group(self.weight_groups.pop(name)["group"])

    def route(self, method: str, path: str):
        return self._routes.get((method, path.split("?", 1)[0]))

    def allowed_fields(self, path: str) -> set[str] | None:
        """Body fields of the emulated version's request class for a POST endpoint (None: no body declared)."""
        if path not in _FIELDS:
            return None
        return _FIELDS[path] | (_NEW_FIELDS.get(path, set()) if self.protocol.selector else set())

    def check_fields(self, method: str, path: str, body: dict | None) -> None:
        """As strict as the emulated SGLang version's route: a declared body must be there, and hold only
        fields of that version's request class."""
        path = path.split("?", 1)[0]
        allowed = self.allowed_fields(path)
        if allowed is None or method != "POST":
            return
        if body is None:
            raise MissingBody(f"{path[1:]}: request body: Field required (SGLang {self.protocol.version} declares one)")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ProtocolError(f"{path[1:]}: field '{unknown[0]}' is not part of SGLang "
                                f"{self.protocol.version}'s request (it would be ignored there)")

    # ---- endpoints: each takes the JSON body and returns (status, JSON-able or text) ------------------

    def health(self, body):
        return 200, ""

    def model_info(self, body):
        return 200, {"model_path": self.model_path, "tokenizer_path": None, "is_generation": True,
                     "weight_version": self.weight_version, "weights_checksum": self._checksum(),
                     "num_mtp_layers": self.engine.model.num_mtp_layers, "context_length": self.engine.max_seq_len}

    def server_info(self, body):
        groups = {name: {k: v for k, v in g.items() if k != "group"} for name, g in self.weight_groups.items()}
        return 200, {**self.counters, "version": self.protocol.version, "engine": "verl_mtp", "paused": self._paused, "speculative_num_steps": self.engine.speculative
                     if self.speculative else 0, "max_running_requests": self.engine.max_batch_size,
                     "weight_update_groups": groups, "memory_released": sorted(self.released),
                     "recent_events": list(self.recent_events)}

    def generate(self, body):
        prompts, batched = prompts_from_request(body)
        params = batch_sampling_params(body.get("sampling_params"))
        if not body.get("return_logprob", False):
            # training needs the behaviour logprobs; a request without them is a client bug, not a preference
            raise ProtocolError("return_logprob must be true: rollout servers always report the target logprobs")
        with self._generation_slot(), self._engine_lock:
            self.counters["generate_requests"] += 1
            self.recent_events.append("generate")
            out = self.engine.generate(prompts, params)
        rid = body.get("rid") or uuid.uuid4().hex
        items = [sample_to_json(s, len(prompts[s.prompt_index]), f"{rid}-{i}", self.weight_version, params,
                                self.speculative, self.protocol.spec_counters) for i, s in enumerate(out.samples)]
        return 200, items if batched or params.n > 1 else items[0]

    def update_weights_from_tensor(self, body):
        if body.get("load_format") != TENSOR_LOAD_FORMAT:
            raise ProtocolError(f"load_format must be {TENSOR_LOAD_FORMAT!r} (got {body.get('load_format')!r}); "
                                "SGLang's default serializer carries CUDA IPC handles, which a CPU server cannot open")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != 1:
            raise ProtocolError("serialized_named_tensors: expected a list with one entry (one tensor-parallel rank)")
        self._check_session("update_weights_from_tensor")
        return self._apply(*self._select(decode_tensors(payloads[0]), body))

    def begin_weight_update(self, body):
        """SGLang 0.5.23's weight-update session: updates are accepted only between begin and end."""
        selector = body.get("selector", "all")
        if selector not in SELECTORS:
            raise ProtocolError(f"begin_weight_update: field 'selector' must be one of {'|'.join(SELECTORS)}, "
                                f"got {selector!r}")
        if self.session is not None:
            raise ProtocolError("a weight-update session is already open; call end_weight_update() first")
        self.session = selector
        return 200, {"success": True, "message": "Success"}

    def end_weight_update(self, body):
        if self.session is None:
            raise ProtocolError("no weight-update session is open; call begin_weight_update() first")
        self.session = None
        return 200, {"success": True, "message": "Success"}

    def update_weight_version(self, body):
        self.weight_version = str(_field(body, "new_version", str, "update_weight_version"))
        return 200, {"success": True, "message": f"Weight version updated to {self.weight_version}",
                     "new_version": self.weight_version}

    def get_weight_version(self, body):
        return 200, {"weight_version": self.weight_version}

    def _check_session(self, where: str) -> None:
        if self.protocol.update_session and self.session is None:
            raise ProtocolError(f"{where} must run between begin_weight_update() and end_weight_update()")

    def _select(self, named, body) -> tuple[list, dict, str]:
        """SGLang 0.5.23's selector: which runners load the tensors (target: the trunk; draft: the MTP layers)."""
        selector = body.get("selector", "all")
        if selector not in SELECTORS:
            raise ProtocolError(f"field 'selector' must be one of {'|'.join(SELECTORS)}, got {selector!r}")
        if selector == "all":
            return named, body, ""
        kept = [(n, t) for n, t in named if (MTP_MARK in n) == (selector == "draft")]
        return kept, body, f", selector {selector}: left {len(named) - len(kept)} tensors as they were"

    def init_weights_update_group(self, body):
        """Join the trainer's weight group as rank `rank_offset` (SGLang's body); blocks until every rank
        has joined. A group of the same name is left first, so a restarted trainer can set it up again."""
        where = "init_weights_update_group"
        address = _field(body, "master_address", str, where)
        port = _field(body, "master_port", int, where)
        rank, world_size = _field(body, "rank_offset", int, where), _field(body, "world_size", int, where)
        name = _field(body, "group_name", str, where, WEIGHT_GROUP_NAME)
        backend = _field(body, "backend", str, where, "nccl")
        if not address or not 0 < port < 65536:
            bad = "master_address" if not address else "master_port"
            raise ProtocolError(f"{where}: field '{bad}' is not a usable address, got {body[bad]!r}")
        if not 1 <= rank < world_size:
            raise ProtocolError(f"{where}: field 'rank_offset' must be in 1..world_size-1 (rank 0 is the trainer), "
                                f"got {rank} with world_size {world_size}")
        if backend not in self._backends():
            raise ProtocolError(f"{where}: field 'backend' must be one of {'|'.join(self._backends())} on this "
                                f"{self._device().type.upper()} server, got {backend!r} (nccl is for SGLang on GPUs)")
        with self._receive_lock:
            if name in self.weight_groups:
                leave_weight_group(self.weight_groups.pop(name)["group"])
            group = join_weight_group(address, port, rank, world_size, name, backend)
            self.weight_groups[name] = {"group": group, "rank": rank, "world_size": world_size, "backend": backend}
        return 200, {"success": True, "message": f"joined weight group {name!r} as rank {rank} of {world_size}"}

    def update_weights_from_distributed(self, body):
        """Receive the listed tensors from the trainer's broadcast, then apply them as the tensor path does.
        All of them are received before any check against the model, so a wrong name or shape is refused
        without leaving the group out of step (the trainer sends them regardless)."""
        where = "update_weights_from_distributed"
        names = _field(body, "names", list, where)
        dtypes, shapes = _field(body, "dtypes", list, where), _field(body, "shapes", list, where)
        for field, values in (("dtypes", dtypes), ("shapes", shapes)):
            if len(values) != len(names):
                raise ProtocolError(f"{where}: field '{field}' has {len(values)} entries for {len(names)} names")
        if not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"{where}: field 'names' must list tensor names (strings)")
        specs = [(_dtype(d, where), _shape(s, where)) for d, s in zip(dtypes, shapes)]
        self._check_session(where)
        name = _field(body, "group_name", str, where, WEIGHT_GROUP_NAME)
        if name not in self.weight_groups:
            raise ProtocolError(f"{where}: field 'group_name': no weight group {name!r}; "
                                "POST /init_weights_update_group first")
        g = self.weight_groups[name]
        with self._receive_lock:
            tensors = receive_tensors(g["group"], specs, g["backend"], self._device())
            self.counters["tensors_received_by_broadcast"] += len(tensors)
        named, body, note = self._select(list(zip(names, tensors)), body)
        return self._apply(named, body, f" received over {g['backend']} group {name!r}{note}")

    def flush_cache(self, body):
        # the engine keeps no prefix cache across requests, so there is never anything stale to drop
        with self._engine_lock:
            self.counters["cache_flushes"] += 1
        return 200, "Cache flushed.\n"

    def pause_generation(self, body):
        """New /generate requests wait; returns once the running one (if any) is done. SGLang's modes
        (abort / retract / in_place) all reduce to this, as a request here is one engine call."""
        with self._gate:
            self._paused = True
            self._gate.wait_for(lambda: self._active == 0)
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body):
        with self._gate:
            self._paused = False
            self._gate.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def release_memory_occupation(self, body):
        """SGLang's sleep: free the listed memory (`tags`, null or empty = all) so the colocated trainer can
        use the device. As in SGLang the server must be idle. Nothing to free on CPU; the state is kept."""
        tags = _memory_tags(body, "release_memory_occupation")
        with self._gate:
            if self._active:
                raise ProtocolError(f"release_memory_occupation: {self._active} generate request(s) in flight; "
                                    "the server must be idle (pause or wait for generation to end first)")
            self.released |= tags
            self.counters["memory_releases"] += 1
            self.recent_events.append("release:" + ",".join(sorted(tags)))
        return 200, {"success": True, "message": f"released {', '.join(sorted(tags))}"}

    def resume_memory_occupation(self, body):
        """SGLang's wake-up: take the listed memory back (`tags`, null or empty = all released)."""
        tags = _memory_tags(body, "resume_memory_occupation")
        with self._gate:
            self.released -= tags
            self.counters["memory_resumes"] += 1
            self.recent_events.append("resume:" + ",".join(sorted(tags)))
        return 200, {"success": True, "message": f"resumed {', '.join(sorted(tags))}"}

    # ---- helpers -----------------------------------------------------------------------------------------

    @contextmanager
    def _generation_slot(self):
        with self._gate:
            if self.released:
                raise Unavailable(f"generate: memory released ({', '.join(sorted(self.released))}) for the "
                                  "colocated trainer; POST /resume_memory_occupation before generating")
            if not self._gate.wait_for(lambda: not self._paused, timeout=self.pause_timeout):
                raise Unavailable(f"generation paused for more than {self.pause_timeout:.0f}s")
            self._active += 1
        try:
            yield
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    def _apply(self, named, body, note: str = ""):
        """Both weight paths end here: check everything, copy, version and checksum (SGLang's answer plus
        ours: weights_checksum, weight_version)."""
        if "weights" in self.released:  # SGLang would write into memory it gave away
            raise ProtocolError("weight update: weights are released; POST /resume_memory_occupation with "
                                "tags [\"weights\"] before updating them")
        self._check_tensors(named)
        with self._engine_lock:
            checksum = self.engine.update_weights(named)
            self.counters["weight_updates"] += 1
            # SGLang 0.5.6 returns early while paused, before it records the version
            recorded = self.protocol.records_version_when_paused or not self._paused
            if body.get("weight_version") is not None and recorded:
                self.weight_version = str(body["weight_version"])
            self.recent_events.append(f"update_weights:{self.weight_version}")
            if body.get("flush_cache", True):
                self.counters["cache_flushes"] += 1
        return 200, {"success": True, "message": f"updated {len(named)} tensors{note}", "weights_checksum": checksum,
                     "weight_version": self.weight_version}

    def _device(self) -> torch.device:
        return next(self.engine.model.parameters()).device

    def _backends(self) -> tuple[str, ...]:
        return ("gloo", "nccl") if self._device().type == "cuda" else ("gloo",)

    def _check_tensors(self, named) -> None:
        """All names and shapes first, so a bad request changes nothing rather than half the model."""
        state = self.engine.model.state_dict()
        for name, t in named:
            if name not in state:
                raise ProtocolError(f"unknown tensor '{name}'")
            if tuple(t.shape) != tuple(state[name].shape):
                raise ProtocolError(f"tensor '{name}' has shape {tuple(t.shape)}, "
                                    f"the served model has {tuple(state[name].shape)}")

    def _checksum(self) -> str:
        with self._engine_lock:
            return self.engine.weights_checksum()


def _field(body: dict, key: str, kind: type, where: str, default=None):
    """body[key] of type `kind` (bools are not ints); missing -> `default`, or an error when there is none."""
    value = body.get(key, default)
    if value is None:
        raise ProtocolError(f"{where}: field '{key}' is required")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}: field '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _memory_tags(body: dict, where: str) -> set[str]:
    """SGLang's optional `tags` of memory release/resume; null or empty means all of them."""
    tags = body.get("tags")
    if not tags:
        return set(MEMORY_TAGS)
    if not isinstance(tags, list) or any(t not in MEMORY_TAGS for t in tags):
        raise ProtocolError(f"{where}: field 'tags' must list some of {'|'.join(MEMORY_TAGS)}, got {tags!r}")
    return set(tags)


def _dtype(name, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"{where}: field 'dtypes': {name!r} is not a torch dtype name")
    return dtype


def _shape(shape, where: str) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ProtocolError(f"{where}: field 'shapes': {shape!r} is not a list of sizes")
    return shape


class _Handler(BaseHTTPRequestHandler):
    server_version = "verl_mtp-rollout"

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        app: RolloutServer = self.server.app
        handler = app.route(method, self.path)
        if handler is None:
            return self._send(404, {"error": {"message": f"no endpoint {method} {self.path}"}})
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else None
            if body is not None and not isinstance(body, dict):
                raise ProtocolError("request body must be a JSON object")
            app.check_fields(method, self.path, body)
            status, payload = handler(body or {})
        except json.JSONDecodeError as e:
            status, payload = 400, {"error": {"message": f"request body is not JSON: {e}"}}
        except MissingBody as e:
            status, payload = 422, {"detail": [{"type": "missing", "loc": ["body"], "msg": str(e)}]}
        except (ProtocolError, ValueError, KeyError) as e:
            message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # KeyError quotes its str
            status, payload = 400, {"error": {"message": message}}
        except Unavailable as e:
            status, payload = 503, {"error": {"message": str(e)}}
        except Exception as e:  # keep serving; the client gets the reason, the log gets the traceback
            traceback.print_exc()
            status, payload = 500, {"error": {"message": f"{type(e).__name__}: {e}"}}
        self._send(status, payload)

    def _send(self, status: int, payload) -> None:
        if isinstance(payload, str):
            data, kind = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # one line per request is noise in a training log
        pass


# ---- command line ---------------------------------------------------------------------------------------


def _depth(value: str):
    return value if value == "auto" else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m verl_mtp.rollout.server", description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", "--model", required=True, help="HF/MiMo model folder (config.json + safetensors)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    ap.add_argument("--port", type=int, default=30000, help="0 = any free port (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here once serving (for launchers)")
    ap.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                    help="dummy: random weights from config.json only; real ones arrive by weight sync")
    ap.add_argument("--random-seed", type=int, default=0, help="seed of the dummy weights")
    ap.add_argument("--context-length", type=int, help="prompt + response tokens (default: the model's maximum)")
    ap.add_argument("--max-running-requests", type=int, default=64, help="concurrent sequences in the engine")
    ap.add_argument("--speculative-algorithm", choices=("EAGLE", "NEXTN"),
                    help="draft with the model's MTP layers (both names mean the same chain drafter here)")
    ap.add_argument("--speculative-num-steps", type=_depth, default="auto",
                    help="draft depth per verify pass, or 'auto' (chosen per batch from measured acceptance)")
    ap.add_argument("--speculative-eagle-topk", type=int, default=1, help="must be 1: the native engine drafts a chain")
    ap.add_argument("--speculative-num-draft-tokens", type=int, help="must be num-steps + 1 when given")
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--sglang-version", default=DEFAULT_SGLANG_VERSION,
                    help="the SGLang version whose protocol this server speaks (and reports in /server_info)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                    help="inference dtype (rollout.dtype); auto: the checkpoint's (float32 as loaded here)")
    ap.add_argument("--num-threads", type=int, default=1, help="torch intra-op threads")
    return ap.parse_args(argv)


def speculative_depth(args: argparse.Namespace, num_mtp_layers: int):
    """SGLang flags -> the engine's depth setting (0 = plain decoding); errors name the flag."""
    if args.speculative_algorithm is None:
        return 0
    if args.speculative_eagle_topk != 1:
        raise SystemExit(f"--speculative-eagle-topk {args.speculative_eagle_topk}: the native engine drafts a "
                         "chain, so it must be 1 (tree drafting is SGLang's)")
    steps = args.speculative_num_steps
    draft_tokens = args.speculative_num_draft_tokens
    if draft_tokens is not None and steps != "auto" and draft_tokens != steps + 1:
        raise SystemExit(f"--speculative-num-draft-tokens {draft_tokens}: a chain of {steps} drafts verifies "
                         f"{steps + 1} tokens")
    if num_mtp_layers == 0:
        raise SystemExit(f"--speculative-algorithm {args.speculative_algorithm}: the model has no MTP layers "
                         "to draft with")
    return steps


def build_server(args: argparse.Namespace) -> RolloutServer:
    torch.set_num_threads(args.num_threads)
    if args.load_format == "dummy":
        torch.manual_seed(args.random_seed)
        with torch.device(args.device):
            model = MTPCausalLM(read_config(args.model_path))
    else:
        model = MTPCausalLM.from_pretrained(args.model_path, device=args.device)
    depth = speculative_depth(args, model.num_mtp_layers)
    context = args.context_length or model.config.max_position_embeddings
    engine = NativeEngine(model, max_batch_size=args.max_running_requests, max_seq_len=context, speculative=depth,
                          dtype=None if args.dtype == "auto" else args.dtype)
    try:
        sglang_version(args.sglang_version)
    except ValueError as e:
        raise SystemExit(f"--sglang-version: {e}") from None
    return RolloutServer(engine, args.model_path, args.host, args.port, weight_version=args.weight_version,
                         speculative=depth != 0, sglang=args.sglang_version)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = build_server(args)
    if args.port_file:  # written whole, then renamed, so a launcher never reads half a number
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(server.httpd.server_address[1]))
        os.replace(tmp, args.port_file)
    print(f"verl_mtp rollout server: {args.model_path} on {server.url}", file=sys.stderr, flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
