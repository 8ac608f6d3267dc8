"""The wire format shared by our rollout server and the trainer's rollout client: the subset of SGLang's
HTTP API the trainer uses, with SGLang's field names and shapes, so the same client drives either.

/generate request (batched; SGLang expands each prompt n times, prompt-major):
    {"input_ids": [[...], ...], "return_logprob": true,
     "sampling_params": {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "n", "sampling_seed",
                         and, when set, "repetition_penalty", "presence_penalty", "frequency_penalty"}}
/generate response: one item per sample
    {"output_ids": [...], "meta_info": {"id", "finish_reason": {"type": "stop", "matched": id} | {"type": "length",
     "length": n}, "prompt_tokens", "completion_tokens", "weight_version", "output_token_logprobs": [[logprob,
     token_id, null], ...], "spec_verify_ct", ACCEPTED, PROPOSED, "spec_accept_rate", "spec_accept_length"}}
  where (ACCEPTED, PROPOSED) are "spec_accept_token_num", "spec_draft_token_num" up to SGLang 0.5.6.post2 and
  "spec_num_correct_drafts", "spec_num_proposed_drafts" from 0.5.23 on (both are read); plus two verl_mtp
  extensions SGLang lacks: "spec_passes_per_depth" and "spec_accepted_per_depth". SGLang's spec_accept_rate
  counts per tree node when speculative_eagle_topk > 1, not per depth; we rebuild ours from the counts.

/update_weights_from_tensor: SGLang's body ({"serialized_named_tensors": [...], "load_format", "flush_cache",
"weight_version"}, plus "selector" from 0.5.23), where real SGLang expects CUDA-IPC handles from its own
serializer.
Our CPU transport is load_format "safetensors_base64": one list entry (one tensor-parallel rank), the base64 of
a safetensors file holding the named tensors. It is plain data: nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import math

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from verl_mtp.rollout.engine import Sample, SpecStats
from verl_mtp.rollout.sampling import SamplingParams

TENSOR_LOAD_FORMAT = "safetensors_base64"
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when a request does not say

# sampling keys we implement, and keys we accept because they cannot change a token-id-only run
_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "n", "sampling_seed",
                  "repetition_penalty", "presence_penalty", "frequency_penalty"}
# the penalties SGLang takes under these names (over the generated tokens, as SamplingParams applies them), with
# their neutral values and the ranges the strictest tested SGLang accepts (0.5.23's SamplingParams.verify)
_PENALTIES = {"repetition_penalty": (1.0, lambda v: 0.0 < v <= 2.0, "(0, 2]"),
              "presence_penalty": (0.0, lambda v: -2.0 <= v <= 2.0, "[-2, 2]"),
              "frequency_penalty": (0.0, lambda v: -2.0 <= v <= 2.0, "[-2, 2]")}
_NEUTRAL_KEYS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}


class ProtocolError(ValueError):
    """A request the server cannot serve as asked; the HTTP layer answers 400 with this message."""


# ---- tensors --------------------------------------------------------------------------------


def encode_tensors(named_tensors) -> str:
    """(name, tensor) pairs -> base64 safetensors. Tensors sharing storage (tied embeddings) are copied,
    as safetensors refuses aliases."""
    seen, out = set(), {}
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return base64.b64encode(save_safetensors(out)).decode("ascii")


def decode_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    try:
        return list(load_safetensors(base64.b64decode(payload, validate=True)).items())
    except Exception as e:  # binascii.Error, SafetensorError: both mean a bad payload
        raise ProtocolError(f"serialized_named_tensors: not base64 safetensors ({e})") from None


# ---- sampling parameters ----------------------------------------------------------------------


def sampling_params_to_json(params: SamplingParams) -> dict:
    if params.stop:
        raise ProtocolError("stop strings need a tokenizer; rollout servers speak token ids (use stop_token_ids)")
    if params.no_repeat_ngram_size:
        raise ProtocolError("no_repeat_ngram_size is not an SGLang sampling parameter; rollout servers cannot "
                            "apply it (the native engine can)")
    out = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k if params.top_k > 0 else -1,
           "max_new_tokens": params.max_new_tokens, "stop_token_ids": list(params.stop_token_ids), "n": params.n}
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    for key, (neutral, _, _) in _PENALTIES.items():
        if getattr(params, key) != neutral:
            out[key] = getattr(params, key)
    return out


def generate_body(prompts: list[list[int]], params: SamplingParams) -> dict:
    """The /generate request the trainer sends: token ids in, token ids and their logprobs out."""
    return {"input_ids": prompts, "sampling_params": sampling_params_to_json(params), "return_logprob": True}


def sampling_params_from_json(d: dict | None) -> SamplingParams:
    d = dict(d or {})
    if d.get("stop"):
        raise ProtocolError("sampling_params.stop: stop strings need a tokenizer; this server speaks token ids")
    d.pop("stop", None)
    unknown = sorted(set(d) - _SAMPLING_KEYS - _NEUTRAL_KEYS)
    if unknown:
        raise ProtocolError(f"sampling_params.{unknown[0]} is not supported by this server")
    try:
        values = {"n": int(d.get("n", 1)), "temperature": float(d.get("temperature", 1.0)),
                  "top_p": float(d.get("top_p", 1.0)), "top_k": int(d.get("top_k", -1)),
                  "max_new_tokens": int(d.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)),
                  "stop_token_ids": [int(t) for t in d.get("stop_token_ids") or []], "seed": d.get("sampling_seed"),
                  **{key: float(d.get(key, neutral)) for key, (neutral, _, _) in _PENALTIES.items()}}
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"sampling_params: {e}") from None
    # what SGLang's SamplingParams.verify refuses, this server refuses too, naming the field
    checks = {"top_k": (values["top_k"] == -1 or values["top_k"] >= 1, "-1 (disable) or at least 1"),
              "top_p": (0.0 < values["top_p"] <= 1.0, "in (0, 1]"),
              "temperature": (math.isfinite(values["temperature"]) and values["temperature"] >= 0, "finite and >= 0"),
              "n": (values["n"] >= 1, "at least 1"), "max_new_tokens": (values["max_new_tokens"] >= 1, "at least 1"),
              **{key: (ok(values[key]), f"in {bounds}") for key, (_, ok, bounds) in _PENALTIES.items()}}
    for key, (ok, rule) in checks.items():
        if not ok:
            raise ProtocolError(f"sampling_params.{key} must be {rule}, got {values[key]}")
    return SamplingParams(**values)


def batch_sampling_params(raw) -> SamplingParams:
    """SGLang allows one dict per prompt; our engine runs one batch with one set, so they must agree."""
    if isinstance(raw, list):
        if any(p != raw[0] for p in raw):
            raise ProtocolError("sampling_params: per-prompt values differ; send one dict for the whole batch")
        raw = raw[0] if raw else None
    return sampling_params_from_json(raw)


def prompts_from_request(body: dict) -> tuple[list[list[int]], bool]:
    """-> (prompts, batched). A flat list is one prompt, as in SGLang."""
    if body.get("text") is not None:
        raise ProtocolError("text prompts need a tokenizer; send input_ids")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise ProtocolError("input_ids: expected a non-empty list of token ids or of lists of token ids")
    batched = isinstance(ids[0], list)
    prompts = ids if batched else [ids]
    if not all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts):
        raise ProtocolError("input_ids: every prompt must be a list of ints")
    return prompts, batched


# ---- responses --------------------------------------------------------------------------------


# meta_info names of (accepted drafts, proposed drafts): SGLang <= 0.5.6.post2, then >= 0.5.23
SPEC_COUNTER_NAMES = (("spec_accept_token_num", "spec_draft_token_num"),
                      ("spec_num_correct_drafts", "spec_num_proposed_drafts"))


def sample_to_json(sample: Sample, prompt_len: int, rid: str, weight_version: str | None,
                   params: SamplingParams, speculative: bool,
                   counter_names: tuple[str, str] = SPEC_COUNTER_NAMES[1]) -> dict:
    tokens = sample.token_ids
    if sample.finish_reason == "stop":
        finish = {"type": "stop", "matched": tokens[-1]}
    else:
        finish = {"type": "length", "length": params.max_new_tokens}
    meta = {"id": rid, "finish_reason": finish, "prompt_tokens": prompt_len, "completion_tokens": len(tokens),
            "weight_version": weight_version,
            "output_token_logprobs": [[lp, tok, None] for lp, tok in zip(sample.logprobs, tokens)]}
    if speculative:
        s = sample.stats
        meta.update({"spec_verify_ct": s.verify_passes, counter_names[0]: s.accepted, counter_names[1]: s.drafted})
        meta.update(spec_accept_rate=s.accepted / s.drafted if s.drafted else 0.0,
                    spec_accept_length=len(tokens) / s.verify_passes if s.verify_passes else 0.0,
                    spec_passes_per_depth=list(s.passes_per_depth),
                    spec_accepted_per_depth=list(s.accepted_per_depth))
    return {"output_ids": tokens, "meta_info": meta}


def spec_stats_from_meta(meta: dict) -> SpecStats | None:
    """Rebuild our counters from SGLang's (either version's names); None when the server did not speculate
    (no spec_* fields). A speculating answer without either pair of counters is an error, not zero accepts:
    reading it as 1.0 accept length would also disarm the stale-draft guard."""
    if "spec_verify_ct" not in meta:
        return None
    verify = int(meta["spec_verify_ct"])
    names = next((pair for pair in SPEC_COUNTER_NAMES if pair[0] in meta), None)
    if names is None:
        if verify == 0:  # SGLang reports no counters for a request that never reached a verify pass
            return SpecStats()
        raise ProtocolError(f"response {meta.get('id')}: spec_verify_ct without accepted/proposed draft counters "
                            f"(expected one of {SPEC_COUNTER_NAMES})")
    accepted, drafted = int(meta[names[0]]), int(meta.get(names[1], 0))
    # every verify pass yields its accepted drafts plus one token of its own (SpecStats.record)
    return SpecStats(verify_passes=verify, generated=accepted + verify, drafted=drafted, accepted=accepted,
                     passes_per_depth=list(meta.get("spec_passes_per_depth", [])),
                     accepted_per_depth=list(meta.get("spec_accepted_per_depth", [])))


def sample_from_json(item: dict) -> tuple[list[int], list[float], str, SpecStats | None]:
    """-> (token ids, logprobs, "stop" | "length", speculation counters) of one response item."""
    meta = item["meta_info"]
    tokens = list(item["output_ids"])
    logprob_rows = meta.get("output_token_logprobs")
    if logprob_rows is None or len(logprob_rows) != len(tokens):
        raise ProtocolError(f"response {meta.get('id')}: output_token_logprobs missing or not one per output token "
                            "(was return_logprob sent?)")
    if any(int(row[1]) != tok for row, tok in zip(logprob_rows, tokens)):
        raise ProtocolError(f"response {meta.get('id')}: output_token_logprobs do not match output_ids")
    finish = meta["finish_reason"]["type"]
    if finish not in ("stop", "length"):
        raise ProtocolError(f"response {meta.get('id')}: generation ended with {meta['finish_reason']}")
    return tokens, [float(row[0]) for row in logprob_rows], finish, spec_stats_from_meta(meta)
