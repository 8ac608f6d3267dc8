"""Runs inside one real SGLang release (PYTHONPATH = its --no-deps install + a few pure-Python deps) and
answers, as JSON on stdout, the questions test_sglang_contract.py asks about what verl_mtp sends it:

  argv      our launch flags parsed by that release's own ServerArgs.add_cli_args parser
  requests  each (method, path, body) we send, validated by a FastAPI app whose routes declare that
            release's own request classes (sglang.srt.managers.io_struct) exactly as its
            entrypoints/http_server.py does (read with ast), plus the body fields the class lacks
  source    facts read from that release's source: the ones our per-version protocol table rests on,
            and whether each meta_info field we read is ever written
  sampling  each sampling_params dict built as that release's tokenizer manager builds one (its own
            SamplingParams(**d), then .verify(vocab_size)): None, or the error it raises
  payload   our colocated per-rank entry (sglang_tensor_payload, built on CPU) opened as that release's
            scheduler opens one: its MultiprocessingSerializer (safe unpickler), its FlattenedTensorBucket

Only imports that cannot load on a CPU-only machine are stubbed (STUBBED, here and nowhere else); no
SGLang code is replaced. Input: a JSON spec on stdin (see test_sglang_contract.contract_spec).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.abc
import importlib.machinery
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated

# CUDA kernels and GPU compilers (sgl_kernel, triton, TVM FFI), and torchvision, whose wheel pins another torch
STUBBED = ("sgl_kernel", "triton", "tvm_ffi", "torchvision")


class _StubClass(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubClass(name, (), {"__init__": lambda self, *a, **k: None})


class _StubModule(types.ModuleType):
    """Any attribute exists: CamelCase ones are classes (isinstance/subclass checks work), the rest modules
    that can be called (decorators such as @triton.jit)."""

    __version__ = "0.0.0"  # torch's inductor reads triton.__version__ on import

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            return _StubClass(name, (), {"__init__": lambda self, *a, **k: None})
        sub = _StubModule(f"{self.__name__}.{name}")
        sub.__path__ = []
        return sub

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _StubModule(self.__name__ + "()")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def routes(http_server: Path) -> dict[str, dict]:
    """path -> {"methods", "body_class", "uses_body_marker"} of every route in http_server.py."""
    out = {}
    for node in ast.walk(ast.parse(http_server.read_text())):
        if not isinstance(node, (ast.AsyncFunctionDef, ast.FunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"
                    and dec.args and isinstance(dec.args[0], ast.Constant)):
                continue
            kind = dec.func.attr
            if kind == "api_route":
                methods = next((ast.literal_eval(k.value) for k in dec.keywords if k.arg == "methods"), ["GET"])
            elif kind in ("get", "post", "put"):
                methods = [kind.upper()]
            else:
                continue
            body_class, marker = None, False
            for arg in node.args.args:
                ann = arg.annotation
                if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
                    ann, marker = ann.slice.elts[0], True
                if isinstance(ann, ast.Name) and ann.id not in ("Request", "float", "str", "int", "bool"):
                    body_class = ann.id
                    break
            out[dec.args[0].value] = {"methods": methods, "body_class": body_class, "uses_body_marker": marker}
    return out


def class_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(getattr(cls, "__struct_fields__", ()))  # msgspec.Struct (0.5.23)


def check_requests(route_table: dict, requests: list) -> list[dict]:
    from fastapi import Body, FastAPI
    from fastapi.testclient import TestClient

    from sglang.srt.managers import io_struct

    app = FastAPI()
    for path, route in route_table.items():
        cls = getattr(io_struct, route["body_class"], None) if route["body_class"] else None
        params = []
        if cls is not None:
            ann = Annotated[cls, Body()] if route["uses_body_marker"] else cls
            params = [inspect.Parameter("obj", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann)]

        async def handler(**kwargs):
            return {"accepted": True}

        handler.__signature__ = inspect.Signature(params)
        app.add_api_route(path, handler, methods=route["methods"])
    client = TestClient(app)
    out = []
    for method, path, body in requests:
        route = route_table.get(path)
        if route is None:
            out.append({"status": 404, "detail": "no such route", "undeclared": []})
            continue
        resp = client.request(method, path, json=body) if body is not None else client.request(method, path)
        cls = getattr(io_struct, route["body_class"], None) if route["body_class"] else None
        declared = class_fields(cls) if cls is not None else set()
        undeclared = sorted(set(body or {}) - declared) if cls is not None else []
        out.append({"status": resp.status_code, "detail": None if resp.status_code == 200 else resp.text[:400],
                    "undeclared": undeclared})
    return out


class _ArgvError(Exception):
    pass


def check_argv(argv: list[str], expected: dict) -> dict:
    """Parse with the release's parser, build its ServerArgs with its own from_cli_args, read back each key.
    __post_init__ is skipped: on 0.5.6 it probes for a GPU (0.5.23's does nothing); the values parsed
    are what we compare."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)

    def error(message):
        raise _ArgvError(message)

    parser.error = error
    try:
        ns = parser.parse_args(argv)
    except _ArgvError as e:
        return {"error": str(e), "parsed": {}}
    ServerArgs.__post_init__ = lambda self: None
    server_args = ServerArgs.from_cli_args(ns)
    return {"error": None, "parsed": {k: getattr(server_args, k, "<missing>") for k in expected}}


def source_facts(root: Path, meta_fields: list[str]) -> dict:
    """What our protocol table claims, read from this release's source."""
    srt = root / "sglang" / "srt"
    managers = srt / "managers"
    updater = managers / "scheduler_components" / "weight_updater.py"
    mixin = managers / "scheduler_update_weights_mixin.py"
    weights_src = (updater if updater.exists() else mixin).read_text()
    tokenizer = (managers / "tokenizer_manager.py").read_text()
    communicator = managers / "tokenizer_communicator_mixin.py"
    comm = communicator.read_text() if communicator.exists() else ""
    dist = re.search(r"def update_weights_from_distributed\(.*?(?=\n    def )", weights_src, re.S).group(0)
    mimo = (srt / "models" / "mimo_mtp.py").read_text()
    return {
        "update_session": "must run between" in weights_src and "begin_weight_update" in weights_src,
        "selector": "_select_runners(recv_req.selector)" in weights_src,
        # 0.5.6's paused branch returns before _update_weight_version_if_provided is reached
        "records_version_when_paused": not re.search(
            r"if self\.is_pause:\s*\n\s*result = \(await self\.update_weights_from_\w+_communicator\(obj\)\)"
            r"\[\s*0\s*\]\s*\n\s*return result\.success", comm),
        "distributed_refreshes_draft": "draft" in dist,
        "meta_fields": {f: bool(re.search(rf"""(meta_info\[|["']){re.escape(f)}["']""", tokenizer))
                        for f in meta_fields},
        "mimo_mtp_one_layer": 'name.replace(group.group(), "model.mtp_block.")' in mimo,
        "server_info_reports_version": '"version": __version__' in (srt / "entrypoints" / "http_server.py").read_text(),
    }


def check_sampling(cases: list[dict], vocab_size: int = 1000) -> list[str | None]:
    from sglang.srt.sampling.sampling_params import SamplingParams

    out = []
    for params in cases:
        try:
            SamplingParams(**params).verify(vocab_size)
            out.append(None)
        except (TypeError, ValueError) as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


def payload_roundtrip(root: Path) -> dict:
    """Our entry of serialized_named_tensors, built by verl_mtp's own sglang_tensor_payload with this
    release's classes (on CPU: shared-memory handles where a GPU gives CUDA IPC ones), deserialized and
    rebuilt with this release's classes; and whether its scheduler opens entry [tp_rank] only and its
    update_weights_from_tensor takes load_format flattened_bucket."""
    import torch

    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    from verl_mtp.rollout.sglang import FLATTENED_BUCKET, sglang_tensor_payload

    named = [("model.norm.weight", torch.arange(6.0).reshape(2, 3)),
             ("model.mtp_layers.0.input_proj.weight", torch.full((2, 2), 0.5, dtype=torch.bfloat16))]
    entry, _keep = sglang_tensor_payload(named, device="cpu")
    opened = MultiprocessingSerializer.deserialize(entry)
    rebuilt = FlattenedTensorBucket(flattened_tensor=opened["flattened_tensor"],
                                    metadata=opened["metadata"]).reconstruct_tensors()
    srt = root / "sglang" / "srt"
    sources = "\n".join(p.read_text() for p in srt.rglob("*.py"))
    runners = "\n".join(p.read_text() for p in (srt / "model_executor").rglob("*.py"))
    return {"names": [n for n, _ in rebuilt],
            "equal": len(rebuilt) == len(named) and all(
                a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(rebuilt, named)),
            "opens_own_rank_entry": bool(re.search(
                r"serialized_named_tensors\[\s*(self\.tp_rank|get_parallel\(\)\.tp_rank)\s*\]", sources)),
            "takes_flattened_bucket": f'load_format == "{FLATTENED_BUCKET}"' in runners}


def main() -> None:
    # transformers decides at import whether torchvision is installed: before the stubs, so it says no
    import transformers.utils.import_utils  # noqa: F401

    sys.meta_path.append(_StubFinder())
    spec = json.load(sys.stdin)
    import sglang

    root = Path(sglang.__file__).resolve().parents[1]
    from sglang.version import __version__

    table = routes(root / "sglang" / "srt" / "entrypoints" / "http_server.py")
    from sglang.srt.managers import io_struct

    for route in table.values():  # the body fields each route's request class declares
        cls = getattr(io_struct, route["body_class"] or "", None)
        route["fields"] = sorted(class_fields(cls)) if cls is not None else None
    report = {"version": __version__, "routes": table,
              "argv": [check_argv(a["argv"], a["expected"]) for a in spec["argv"]],
              "requests": check_requests(table, spec["requests"]),
              "sampling": check_sampling(spec.get("sampling", [])),
              "source": source_facts(root, spec["meta_fields"]), "payload": payload_roundtrip(root)}
    print("CONTRACT-REPORT " + json.dumps(report, default=repr))


if __name__ == "__main__":
    main()
