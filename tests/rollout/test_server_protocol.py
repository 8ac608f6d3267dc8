"""The rollout server's SGLang protocol over real HTTP on 127.0.0.1 (server in-process, ephemeral port):
/generate shapes and equality with the engine, seeds, errors, weight updates, pause/continue, the codec,
and that it is at least as strict as the SGLang version it emulates (bodies, sessions, fields)."""

import threading
import urllib.error
import urllib.request

import pytest
import torch

from tests.conftest import toy_config
from tests.rollout.conftest import DEPTH, engine_for
from verl_mtp.models import MTPCausalLM, state_checksum
from verl_mtp.rollout import SamplingParams
from verl_mtp.rollout.client import ReplicaClient, ReplicaError, encode_native
from verl_mtp.rollout.protocol import (TENSOR_LOAD_FORMAT, ProtocolError, decode_tensors, encode_tensors, sample_from_json,
                                       sampling_params_to_json)
from verl_mtp.rollout.server import RolloutServer

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [10], [11, 12]]


@pytest.fixture()
def served(models):
    """A fresh server per test (weights change in some tests); starting one in-process costs milliseconds."""
    server = RolloutServer(engine_for(models[0]), "toy", port=0, speculative=True).start()
    yield server, ReplicaClient(server.url, timeout=30)
    server.shutdown()


def _serve(models, sglang):
    server = RolloutServer(engine_for(models[0]), "toy", port=0, speculative=True, sglang=sglang).start()
    return server, ReplicaClient(server.url, timeout=30)


def _generate(client, params, prompts=PROMPTS):
    body = {"input_ids": prompts, "sampling_params": sampling_params_to_json(params), "return_logprob": True}
    return client.request("POST", "/generate", body)


def test_server_binds_localhost_by_default(served):
    server, client = served
    assert server.url.startswith("http://127.0.0.1:")
    assert client.request("GET", "/health") == ""
    info = client.request("GET", "/get_model_info")
    assert info["is_generation"] and info["weight_version"] == "default" and info["num_mtp_layers"] == 2


def test_generate_matches_engine_with_sglang_shapes(served, models):
    _, client = served
    params = SamplingParams(n=2, temperature=0, max_new_tokens=20, stop_token_ids=[3])
    items = _generate(client, params)
    ref = engine_for(models[0]).generate(PROMPTS, params)
    assert len(items) == len(PROMPTS) * 2  # prompt-major, n per prompt
    for k, (item, sample) in enumerate(zip(items, ref.samples)):
        meta = item["meta_info"]
        assert sample.prompt_index == k // 2
        assert item["output_ids"] == sample.token_ids
        assert meta["output_token_logprobs"] == [[lp, t, None] for lp, t in zip(sample.logprobs, sample.token_ids)]
        assert meta["prompt_tokens"] == len(PROMPTS[k // 2]) and meta["completion_tokens"] == len(sample.token_ids)
        finish = meta["finish_reason"]
        assert finish["type"] == sample.finish_reason
        expected = {"type": "stop", "matched": 3} if finish["type"] == "stop" else {"type": "length", "length": 20}
        assert finish == expected
        s = sample.stats
        assert (meta["spec_verify_ct"], meta["spec_num_correct_drafts"], meta["spec_num_proposed_drafts"]) == \
            (s.verify_passes, s.accepted, s.drafted)
        assert meta["spec_num_proposed_drafts"] == DEPTH * meta["spec_verify_ct"]  # fixed depth: S drafts per pass
        assert meta["spec_accept_length"] == (len(sample.token_ids) / s.verify_passes if s.verify_passes else 0.0)
        tokens, logprobs, reason, stats = sample_from_json(item)
        assert (tokens, logprobs, reason) == (sample.token_ids, sample.logprobs, sample.finish_reason)
        assert stats.metrics() == s.metrics()
    assert any(i["meta_info"]["finish_reason"]["type"] == "stop" for i in items)
    assert ref.stats.accept_length > 2.0  # speculation really ran, and mostly accepted


def test_single_prompt_returns_one_item_and_seed_reproduces(served):
    _, client = served
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=7)
    first = _generate(client, params, PROMPTS[0])
    assert isinstance(first, dict) and len(first["output_ids"]) == 16
    again = _generate(client, params, PROMPTS[0])
    assert again["output_ids"] == first["output_ids"]
    assert again["meta_info"]["output_token_logprobs"] == first["meta_info"]["output_token_logprobs"]
    others = [_generate(client, SamplingParams(temperature=1.0, max_new_tokens=16, seed=s), PROMPTS[0])["output_ids"]
              for s in (8, 9, 10)]
    assert any(o != first["output_ids"] for o in others)


def test_penalties_reach_the_engine_and_the_client_refuses_what_sglang_lacks(served, models):
    """SGLang's repetition/presence/frequency penalties travel in the request and are applied as the engine
    applies them (same tokens as the engine called directly, and not the unpenalised ones)."""
    _, client = served
    params = SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=1.8, frequency_penalty=0.7)
    items = _generate(client, params)
    ref = engine_for(models[0]).generate(PROMPTS, params)
    assert [i["output_ids"] for i in items] == [s.token_ids for s in ref.samples]
    plain = engine_for(models[0]).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=12))
    assert [s.token_ids for s in plain.samples] != [s.token_ids for s in ref.samples]
    with pytest.raises(ProtocolError, match="no_repeat_ngram_size is not an SGLang sampling parameter"):
        sampling_params_to_json(SamplingParams(no_repeat_ngram_size=2))


@pytest.mark.parametrize("body, needle", [
    ({"text": "hi", "sampling_params": {}, "return_logprob": True}, "text prompts need a tokenizer"),
    ({"input_ids": [[1, 2]], "sampling_params": {}}, "return_logprob must be true"),
    ({"input_ids": [[1, 2]], "sampling_params": {"min_p": 0.1}, "return_logprob": True}, "sampling_params.min_p"),
    ({"input_ids": [[1, 2]], "sampling_params": {"stop": ["x"]}, "return_logprob": True}, "stop strings"),
    ({"input_ids": [[1, 99]], "sampling_params": {"max_new_tokens": 4}, "return_logprob": True}, "out of range"),
    ({"input_ids": [[1], [2]], "sampling_params": [{"n": 1}, {"n": 2}], "return_logprob": True}, "per-prompt"),
    ({"input_ids": [[1, 2]], "sampling_params": {"top_k": 0}, "return_logprob": True}, "sampling_params.top_k"),
    ({"input_ids": [[1, 2]], "sampling_params": {"repetition_penalty": 0}, "return_logprob": True},
     "sampling_params.repetition_penalty must be in (0, 2]"),
])
def test_generate_rejects_what_it_cannot_serve(served, body, needle):
    _, client = served
    with pytest.raises(ReplicaError, match="HTTP 400") as info:
        client.request("POST", "/generate", body)
    assert needle in str(info.value) and client.url in str(info.value)


def test_unknown_endpoint_bad_json_and_distributed_sync_are_clear(served):
    server, client = served
    with pytest.raises(ReplicaError, match="HTTP 404"):
        client.request("GET", "/nope")
    with pytest.raises(ReplicaError, match="update_weights_from_distributed: field 'dtypes' is required"):
        client.request("POST", "/update_weights_from_distributed", {"names": []})  # more in test_distributed_sync
    req = urllib.request.Request(server.url + "/generate", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10)
    assert info.value.code == 400 and b"not JSON" in info.value.read()


def _update(client, named, selector="all", **extra):
    """One update inside a weight-update session (SGLang 0.5.23, the default emulated version)."""
    body = {"serialized_named_tensors": encode_native(named), "load_format": TENSOR_LOAD_FORMAT, **extra}
    client.request("POST", "/begin_weight_update", {"selector": selector})
    try:
        return client.request("POST", "/update_weights_from_tensor", {**body, "selector": selector})
    finally:
        client.request("POST", "/end_weight_update", {})


def test_weight_update_returns_checksum_and_changes_outputs(served, models):
    _, client = served
    params = SamplingParams(temperature=0, max_new_tokens=12)
    before = [i["output_ids"] for i in _generate(client, params)]
    torch.manual_seed(123)
    fresh = list(MTPCausalLM(toy_config()).state_dict().items())
    answer = _update(client, fresh, weight_version="7")
    assert answer["success"] and answer["weights_checksum"] == state_checksum(fresh)
    info = client.request("GET", "/get_model_info")
    assert info["weight_version"] == "7" and info["weights_checksum"] == state_checksum(fresh)
    after = _generate(client, params)
    assert [i["output_ids"] for i in after] != before and after[0]["meta_info"]["weight_version"] == "7"
    good = list(models[0].state_dict().items())
    assert _update(client, good)["weights_checksum"] == state_checksum(good)
    assert [i["output_ids"] for i in _generate(client, params)] == before


def test_bad_weight_updates_change_nothing(served, models):
    _, client = served
    checksum = client.request("GET", "/get_model_info")["weights_checksum"]
    named = list(models[1].state_dict().items())
    with pytest.raises(ReplicaError, match="load_format must be 'safetensors_base64'"):
        _update(client, named, load_format=None)
    with pytest.raises(ReplicaError, match="unknown tensor 'model.nope'"):
        _update(client, named + [("model.nope", torch.zeros(2))])
    with pytest.raises(ReplicaError, match="has shape"):
        _update(client, [(named[0][0], torch.zeros(3, 3))] + named[1:])
    client.request("POST", "/begin_weight_update", {})
    with pytest.raises(ReplicaError, match="not base64 safetensors"):
        client.request("POST", "/update_weights_from_tensor",
                       {"serialized_named_tensors": ["@@"], "load_format": TENSOR_LOAD_FORMAT})
    client.request("POST", "/end_weight_update", {})
    assert client.request("GET", "/get_model_info")["weights_checksum"] == checksum


def test_target_only_update_leaves_the_draft_stale(served, models):
    """selector=target (SGLang 0.5.23) skips the MTP tensors: exactly the failure the guard exists for."""
    _, client = served
    named = list(models[1].state_dict().items())
    answer = _update(client, named, selector="target")
    assert "left" in answer["message"] and answer["weights_checksum"] != state_checksum(named)
    assert _update(client, named)["weights_checksum"] == state_checksum(named)


def test_as_strict_as_sglang_about_bodies_fields_and_sessions(served, models):
    """What real SGLang refuses (422 without a declared body, 400 outside a 0.5.23 session), this server
    refuses too; fields SGLang would silently ignore (the invented disable_draft_model) are refused here."""
    server, client = served
    req = urllib.request.Request(server.url + "/continue_generation", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10)
    assert info.value.code == 422 and b"Field required" in info.value.read()
    body = {"serialized_named_tensors": encode_native(models[1].state_dict().items()),
            "load_format": TENSOR_LOAD_FORMAT}
    checksum = client.request("GET", "/model_info")["weights_checksum"]
    with pytest.raises(ReplicaError, match="HTTP 400: update_weights_from_tensor must run between "
                                           "begin_weight_update"):
        client.request("POST", "/update_weights_from_tensor", body)
    with pytest.raises(ReplicaError, match="HTTP 400: no weight-update session is open"):
        client.request("POST", "/end_weight_update", {})
    with pytest.raises(ReplicaError, match="field 'disable_draft_model' is not part of SGLang 0.5.23's request"):
        _update(client, models[1].state_dict().items(), disable_draft_model=False)
    assert client.request("GET", "/model_info")["weights_checksum"] == checksum
    assert client.request("GET", "/server_info")["version"] == "0.5.23"


def test_emulated_0_5_6_drops_the_version_while_paused_and_has_no_sessions(models):
    """SGLang 0.5.6: no session endpoints or selector, and an update made while paused keeps the old
    weight_version (its early return), so the version must be recorded by /update_weight_version."""
    server, client = _serve(models, "0.5.6")
    try:
        with pytest.raises(ReplicaError, match="HTTP 404"):
            client.request("POST", "/begin_weight_update", {})
        body = {"serialized_named_tensors": encode_native(models[1].state_dict().items()),
                "load_format": TENSOR_LOAD_FORMAT, "weight_version": "3"}
        with pytest.raises(ReplicaError, match="field 'selector' is not part of SGLang 0.5.6's request"):
            client.request("POST", "/update_weights_from_tensor", {**body, "selector": "all"})
        client.request("POST", "/pause_generation", {"mode": "abort"})
        assert client.request("POST", "/update_weights_from_tensor", body)["success"]
        assert client.request("GET", "/weight_version")["weight_version"] == "default"
        client.request("POST", "/update_weight_version", {"new_version": "3", "abort_all_requests": False})
        client.request("POST", "/continue_generation", {})
        assert client.request("GET", "/model_info")["weight_version"] == "3"
        item = _generate(client, SamplingParams(temperature=0, max_new_tokens=8))[0]
        assert "spec_accept_token_num" in item["meta_info"] and "spec_num_correct_drafts" not in item["meta_info"]
    finally:
        server.shutdown()


def test_pause_holds_generation_until_continue(served):
    server, client = served
    assert client.request("POST", "/pause_generation", {"mode": "abort"})["status"] == "ok"
    done = threading.Event()
    worker = threading.Thread(target=lambda: (_generate(client, SamplingParams(temperature=0, max_new_tokens=4)),
                                              done.set()))
    worker.start()
    assert not done.wait(0.5) and server.server_info({})[1]["paused"]
    client.request("POST", "/continue_generation", {})
    assert done.wait(20)
    worker.join()
    assert client.request("GET", "/get_server_info")["generate_requests"] == 1


def test_codec_round_trips_tied_tensors_without_pickle():
    shared = torch.randn(4, 3)
    named = [("model.embed_tokens.weight", shared), ("lm_head.weight", shared), ("b", torch.arange(5))]
    back = dict(decode_tensors(encode_tensors(named)))
    assert set(back) == {n for n, _ in named}
    for name, t in named:
        assert torch.equal(back[name], t) and back[name].dtype == t.dtype


def test_released_memory_refuses_generate_and_weight_updates_until_resumed(served, models):
    """Colocated server mode's sleep/wake: nothing is freed on CPU, but the server refuses what SGLang could
    not do without the memory, and logs the order of calls."""
    _, client = served
    params = SamplingParams(temperature=0, max_new_tokens=4)
    client.request("POST", "/release_memory_occupation", {"tags": ["kv_cache", "weights"]})
    with pytest.raises(ReplicaError, match=r"HTTP 503: generate: memory released \(kv_cache, weights\)"):
        _generate(client, params)
    body = {"serialized_named_tensors": encode_native(models[1].state_dict().items()),
            "load_format": TENSOR_LOAD_FORMAT, "weight_version": "1"}
    client.request("POST", "/begin_weight_update", {})
    with pytest.raises(ReplicaError, match=r"HTTP 400: weight update: weights are released"):
        client.request("POST", "/update_weights_from_tensor", body)
    client.request("POST", "/resume_memory_occupation", {"tags": ["weights"]})
    assert client.request("POST", "/update_weights_from_tensor", body)["success"]
    client.request("POST", "/end_weight_update", {})
    with pytest.raises(ReplicaError, match=r"memory released \(kv_cache\)"):
        _generate(client, params)
    client.request("POST", "/resume_memory_occupation", {})  # SGLang's empty body: all of it
    _generate(client, params)
    info = client.request("GET", "/get_server_info")
    assert info["memory_released"] == [] and (info["memory_releases"], info["memory_resumes"]) == (1, 2)
    assert info["recent_events"] == ["release:kv_cache,weights", "resume:weights", "update_weights:1",
                                     "resume:cuda_graph,kv_cache,weights", "generate"]
    with pytest.raises(ReplicaError, match=r"HTTP 400: release_memory_occupation: field 'tags' must list"):
        client.request("POST", "/release_memory_occupation", {"tags": ["gpu"]})
