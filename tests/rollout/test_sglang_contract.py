"""Contract tests against the real SGLang packages (0.5.6, 0.5.6.post2, 0.5.23), on CPU.

Each release is pip-installed with --no-deps into a cache folder (sglang_contract/install.py) and asked,
in its own subprocess (sglang_contract/worker.py), about what verl_mtp sends it:
  - our launch argv parses under its own ServerArgs parser, every value round-tripping;
  - every request our client sends, in both sync modes and around them, is accepted by FastAPI routes
    declaring its own request classes exactly as its http_server.py does, with no field it lacks;
  - our per-version protocol table (sglang.SGLANG_VERSIONS: session, selector, version recording,
    split-mode draft refresh, counter names, one-layer MTP draft) is what its source says;
  - the meta_info fields we read are written by its output code;
  - our colocated per-rank entry (sglang_tensor_payload, on CPU) opens with its serializer and bucket class.
Without network or index the tests skip, naming the reason. First run ~1 min to install (~300 MB cached).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.rollout.sglang_contract.install import Unavailable, read_report, start_worker
from verl_mtp.config import load_config
from verl_mtp.rollout.client import encode_native
from verl_mtp.rollout.protocol import ProtocolError, generate_body, sampling_params_from_json, sampling_params_to_json
from verl_mtp.rollout.sampling import SamplingParams
from verl_mtp.rollout.sglang import (DEFAULT_SGLANG_VERSION, FLATTENED_BUCKET, MTP_DRAFT_LAYERS, SGLANG_VERSIONS,
                                     SLEEP_TAGS, launch_command, sglang_server_args, weight_sync_plan,
                                     weight_update_group)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "dapo_mimo_7b_mtp_megatron_sglang.sh"
VERSIONS = list(SGLANG_VERSIONS)
NAMED = [("model.embed_tokens.weight", torch.ones(4, 2)), ("model.norm.weight", torch.ones(2)),
         ("model.mtp_layers.0.input_proj.weight", torch.ones(2, 4, dtype=torch.bfloat16))]
# list and dict engine_kwargs: SGLang's nargs flags take one value per item, its JSON flags a JSON string
ENGINE_KWARGS = ['+actor_rollout_ref.rollout.engine_kwargs.sglang.lora_target_modules=[q_proj,v_proj]',
                 '+actor_rollout_ref.rollout.engine_kwargs.sglang.json_model_override_args={rope_theta: 10000}']


def _configs():
    from tests.rollout.test_sglang_launch import recipe_overrides

    base = recipe_overrides(RECIPE, RAY_DATA_HOME="/data")
    split = ["actor_rollout_ref.hybrid_engine=False", "actor_rollout_ref.rollout.server.sync_mode=distributed"]
    return {"colocated": load_config(base + ENGINE_KWARGS, config_name="ppo_megatron_trainer"),
            "split, no MTP rollout": load_config(recipe_overrides(RECIPE, RAY_DATA_HOME="/data", MTP_ROLLOUT="False")
                                                 + split, config_name="ppo_megatron_trainer")}


def _launch_args() -> dict[str, dict]:
    return {name: sglang_server_args(cfg, port=31000, base_gpu_id=4) for name, cfg in _configs().items()}


def _requests(version: str) -> list[tuple[str, str, str, dict | None]]:
    """(what, method, path, body) of every call the client makes to an SGLang replica of `version`."""
    proto = SGLANG_VERSIONS[version]
    calls = [("detect", "GET", "/server_info", None)]
    # colocated SGLang: one entry per TP rank of the recipe's replicas (4), flattened buckets
    tensor = weight_sync_plan(NAMED, 3, "tensor", encode=lambda bucket: encode_native(bucket) * 4,
                              load_format=FLATTENED_BUCKET, protocol=proto)
    group = weight_update_group("10.0.0.1", 29600, num_replicas=2, ranks_per_replica=4)
    split = weight_sync_plan(NAMED, 4, "distributed", init_group=group, protocol=proto)
    for mode, plan in (("tensor", tensor), ("distributed", split)):
        calls += [(f"{mode} sync", c.method, c.path, c.resolved().body_for(1)) for c in plan]
    calls += [("sleep", "POST", "/release_memory_occupation", {"tags": list(SLEEP_TAGS)}),
              ("wake", "POST", "/resume_memory_occupation", {"tags": ["weights"]}),
              ("wake", "POST", "/resume_memory_occupation", {"tags": ["kv_cache"]}),
              ("generate", "POST", "/generate",
               generate_body([[1, 2, 3], [4, 5]], SamplingParams(n=2, temperature=1.0, max_new_tokens=8,
                                                                  stop_token_ids=[2], seed=7)))]
    return calls


# sampling_params we send (every penalty SGLang and our engine share, set), and bodies some tested SGLang refuses
SENT_SAMPLING = sampling_params_to_json(SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=8,
                                                       stop_token_ids=[2], seed=7, repetition_penalty=1.2,
                                                       presence_penalty=0.5, frequency_penalty=-0.3))
REFUSED_SAMPLING = [{"top_k": 0}, {"top_k": -2}, {"top_p": 0.0}, {"temperature": -1.0},
                    {"repetition_penalty": 0.0}, {"repetition_penalty": 2.5}, {"presence_penalty": 2.5},
                    {"frequency_penalty": -3.0}, {"no_repeat_ngram_size": 3}]


# what today's client must never send again, and what SGLang says to it: the harness can fail
CANARIES = [("POST", "/continue_generation", None), ("POST", "/update_weights_from_tensor",
                                                       {"serialized_named_tensors": ["YWJj"], "disable_draft_model": False})]


def _meta_fields(version: str) -> list[str]:
    """meta_info fields protocol.sample_from_json / spec_stats_from_meta read from this version."""
    return ["output_token_logprobs", "finish_reason", "spec_verify_ct", *SGLANG_VERSIONS[version].spec_counters]


def _argv(args: dict) -> list[str]:
    return launch_command(args, python=sys.executable)[3:]


@pytest.fixture(scope="module")
def reports():
    """version -> the worker's report (or the reason it is unavailable); the three run side by side."""
    launches = _launch_args()
    running, out = {}, {}
    for version in VERSIONS:
        spec = {"argv": [{"argv": _argv(a), "expected": a} for a in launches.values()],
                "requests": [list(r[1:]) for r in _requests(version)] + [list(c) for c in CANARIES],
                "meta_fields": _meta_fields(version), "sampling": [SENT_SAMPLING, *REFUSED_SAMPLING]}
        try:
            running[version] = start_worker(version, spec)
        except Unavailable as e:
            out[version] = str(e)
    for version, proc in running.items():
        out[version] = read_report(proc)
    return out


@pytest.fixture(params=VERSIONS)
def report(request, reports):
    got = reports[request.param]
    if isinstance(got, str):
        pytest.skip(f"SGLang {request.param} not installable here: {got}")
    assert got["version"] == request.param
    return got


def _same(sent, parsed) -> bool:
    if isinstance(sent, dict):
        return isinstance(parsed, str) and json.loads(parsed) == sent
    if sent is False:
        return not parsed  # omitted from the argv: the parser's default is off
    if isinstance(sent, float):
        return parsed == pytest.approx(sent)
    return parsed == sent


def test_launch_argv_round_trips_through_sglangs_own_parser(report):
    for (name, args), result in zip(_launch_args().items(), report["argv"]):
        assert result["error"] is None, f"{name}: SGLang {report['version']} refuses our argv: {result['error']}"
        wrong = {k: (v, result["parsed"][k]) for k, v in args.items() if v is not None
                 and not _same(v, result["parsed"][k])}
        assert not wrong, f"{name}: (sent, parsed by SGLang {report['version']}): {wrong}"


def test_every_request_is_accepted_by_sglangs_own_request_classes(report):
    calls = _requests(report["version"])
    answers = report["requests"][:len(calls)]
    for (what, method, path, body), answer in zip(calls, answers):
        where = f"{what}: {method} {path} on SGLang {report['version']}"
        assert answer["status"] == 200, f"{where} -> {answer['status']} {answer['detail']}"
        assert answer["undeclared"] == [], f"{where}: fields SGLang would silently ignore: {answer['undeclared']}"
        if method == "POST" and report["routes"][path]["body_class"]:
            assert body is not None, f"{where}: SGLang declares a body"


def test_sampling_params_we_send_pass_sglangs_own_checks_and_we_refuse_what_it_refuses(report):
    """Our client's sampling_params (penalties included) pass that release's SamplingParams(...).verify; every
    body it refuses, our server refuses too (at least as strict: 0.5.6 takes repetition_penalty 0, 0.5.23 not)."""
    sent, *refused = report["sampling"]
    assert sent is None, f"SGLang {report['version']} refuses our sampling_params {SENT_SAMPLING}: {sent}"
    assert {k: SENT_SAMPLING[k] for k in ("repetition_penalty", "presence_penalty", "frequency_penalty", "top_k")} == \
        {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.3, "top_k": -1}
    assert sum(error is not None for error in refused) >= len(refused) - 1, refused  # the harness can fail
    for body, error in zip(REFUSED_SAMPLING, refused):
        if error is not None:
            with pytest.raises(ProtocolError, match=f"sampling_params.{next(iter(body))}"):
                sampling_params_from_json(body)


def test_the_harness_rejects_what_the_old_client_sent(report):
    """The bodiless /continue_generation and the invented disable_draft_model of the old client."""
    no_body, invented = report["requests"][-len(CANARIES):]
    assert no_body["status"] == 422 and "Field required" in no_body["detail"]
    assert invented["undeclared"] == ["disable_draft_model"]


def test_our_protocol_table_is_what_sglangs_source_says(report):
    proto, facts = SGLANG_VERSIONS[report["version"]], report["source"]
    for key in ("update_session", "selector", "records_version_when_paused", "distributed_refreshes_draft"):
        assert facts[key] == getattr(proto, key), f"SGLang {report['version']}: {key} is {facts[key]} in its source"
    assert facts["mimo_mtp_one_layer"] and MTP_DRAFT_LAYERS == 1
    assert facts["server_info_reports_version"]  # what detect_protocol reads


def test_our_per_rank_payload_opens_with_that_versions_own_classes(report):
    """The colocated entry (sglang_tensor_payload) passes the release's safe unpickler and rebuilds every
    tensor exactly through its FlattenedTensorBucket; its scheduler ranks each open their own entry, and
    its tensor update takes load_format flattened_bucket (so the list has one entry per TP rank)."""
    payload = report["payload"]
    assert payload["names"] == ["model.norm.weight", "model.mtp_layers.0.input_proj.weight"] and payload["equal"]
    assert payload["opens_own_rank_entry"] and payload["takes_flattened_bucket"]


def test_the_sync_sequence_is_what_the_version_requires(report):
    """Updates inside begin/end where the release refuses them otherwise; the version recorded by
    /update_weight_version where the release drops it while paused; a body on every POST."""
    proto = SGLANG_VERSIONS[report["version"]]
    for mode in ("tensor sync", "distributed sync"):
        paths = [path for what, _, path, _ in _requests(report["version"]) if what == mode]
        updates = [i for i, p in enumerate(paths) if p.startswith("/update_weights_from_")]
        assert paths.index("/pause_generation") < updates[0] and updates[-1] < paths.index("/continue_generation")
        if proto.update_session:
            assert paths.index("/begin_weight_update") < updates[0] < updates[-1] < paths.index("/end_weight_update")
        else:
            assert "/begin_weight_update" not in paths and "/begin_weight_update" not in report["routes"]
        assert ("/update_weight_version" in paths) == (not proto.records_version_when_paused)
        if "/update_weight_version" in paths:  # after the updates, whose own weight_version was dropped
            assert paths.index("/update_weight_version") > updates[-1]
        assert paths[-1] == "/model_info" and paths[-1] in report["routes"]


def test_the_meta_info_fields_we_read_are_written_by_that_version(report):
    missing = [f for f, written in report["source"]["meta_fields"].items() if not written]
    assert not missing, f"SGLang {report['version']} never writes meta_info {missing}"


def test_pinned_sglang_versions_agree():
    """pyproject's sglang extra and the Dockerfile install the default of the tested versions."""
    extra = re.search(r'^sglang = \["sglang\[all\]==([^"]+)"\]', (REPO / "pyproject.toml").read_text(), re.M)
    docker = re.search(r"^ARG SGLANG_VERSION=(\S+)", (REPO / "docker" / "Dockerfile").read_text(), re.M)
    assert extra and docker and extra.group(1) == docker.group(1) == DEFAULT_SGLANG_VERSION
    assert DEFAULT_SGLANG_VERSION in SGLANG_VERSIONS


def test_our_server_is_at_least_as_strict_as_that_version(report, models):
    """Every POST our server serves takes at most the fields of that version's request class (it refuses
    the rest, SGLang ignores them), requires a body where SGLang declares one, and has the session
    endpoints exactly where that version has them."""
    from tests.rollout.conftest import engine_for
    from verl_mtp.rollout.server import RolloutServer

    version, routes = report["version"], report["routes"]
    server = RolloutServer(engine_for(models[0]), "toy", port=0, sglang=version)
    try:
        ours = {path for method, path in server._routes if method == "POST"}
        for path in sorted(ours - {"/generate", "/flush_cache"}):
            real = routes[path]
            assert real["fields"] is not None, f"{path}: SGLang {version} declares no body, ours requires one"
            extra = server.allowed_fields(path) - set(real["fields"])
            assert not extra, f"{path}: ours accepts {sorted(extra)}, which SGLang {version}'s class lacks"
            with pytest.raises(ValueError, match="Field required"):
                server.check_fields("POST", path, None)
        assert ({"/begin_weight_update", "/end_weight_update"} <= ours) == ("/begin_weight_update" in routes)
    finally:
        server.httpd.server_close()
