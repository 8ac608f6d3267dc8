"""HF-folder checkpoint IO: MiMo layout out, MiMo / Qwen2 / Llama folders in. Never unpickles code.

A folder we save carries modeling code for transformers' `trust_remote_code` (transformers has no built-in
`mimo`): `configuration_mimo.py` / `modeling_mimo.py` from `hf_mimo/` and their `auto_map` in config.json,
or, when the model came from a MiMo folder with its own code (Xiaomi's release), that folder's `*.py`
and `auto_map` unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from verl_mtp.models.config import ModelConfig

_MTP_KEY = re.compile(r"^model\.mtp_layers\.(\d+)\.(.+)$")
# tensors of a decoder block that an MTP layer shares in name with a trunk layer
_BLOCK_PARTS = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
_HF_CODE = Path(__file__).parent / "hf_mimo"
_HF_AUTO_MAP = {"AutoConfig": "configuration_mimo.MiMoConfig", "AutoModel": "modeling_mimo.MiMoModel",
                "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"}
_OUR_CODE_MARK = "verl_mtp:hf_mimo"  # in our files: a folder we saved gets today's code on its next save


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, or does not match the model."""


def read_config(path: str | os.PathLike) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF model folder)")
    try:
        hf = json.loads(cfg_file.read_text())
        cfg = ModelConfig.from_hf_dict(hf)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable config: {e}") from None
    cfg.remote_code = _own_remote_code(Path(path), hf)
    return cfg


def _own_remote_code(folder: Path, hf: dict) -> dict:
    """A MiMo folder's own `auto_map` and `*.py`, to keep in every folder saved from it; empty for other
    architectures and for folders whose code is ours."""
    if hf.get("model_type") != "mimo" or "auto_map" not in hf:
        return {}
    files = {p.name: p.read_text() for p in sorted(folder.glob("*.py"))}
    if any(_OUR_CODE_MARK in text for text in files.values()):
        return {}
    return {"auto_map": hf["auto_map"], "files": files}


def _remote_code(cfg: ModelConfig) -> dict:
    if cfg.remote_code:
        return cfg.remote_code
    return {"auto_map": _HF_AUTO_MAP, "files": {p.name: p.read_text() for p in sorted(_HF_CODE.glob("*.py"))}}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, sharded safetensors, or pytorch_model.bin (weights only)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        return _load_torch_weights_only(folder / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors, shard index or pytorch_model.bin")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return state


def _load_torch_weights_only(f: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler refuses code objects; say so in one line
        raise CheckpointError(f"{f}: refused to load (weights_only=True): {str(e).splitlines()[0]}") from None


def _fill_missing_mtp(model, state: dict[str, torch.Tensor], k_folder: int, init_mtp_from: str) -> None:
    """MTP layers the folder lacks: copy folder layer 0 (MiMo's recipe) when it has one, else per
    `init_mtp_from`: 'random' keeps the fresh init, 'last_layer' copies the last trunk block."""
    cfg = model.config
    own = model.state_dict()
    for i in range(k_folder, cfg.num_nextn_predict_layers):
        prefix = f"model.mtp_layers.{i}."
        for name in (n for n in own if n.startswith(prefix)):
            part = name[len(prefix):]
            if k_folder > 0:
                state[name] = state[f"model.mtp_layers.0.{part}"]
            elif init_mtp_from == "last_layer" and part.startswith(_BLOCK_PARTS):
                # an FFN of the other kind (dense vs MoE, see first_k_dense_replace / moe_in_mtp) stays fresh
                state[name] = state.get(f"model.layers.{cfg.num_hidden_layers - 1}.{part}", own[name])
            elif init_mtp_from not in ("random", "last_layer"):
                raise CheckpointError(f"init_mtp_from must be 'random' or 'last_layer', got {init_mtp_from!r}")
            else:
                state[name] = own[name]


def load_pretrained(cls, path, num_mtp_layers=None, dtype=torch.float32, init_mtp_from="random", device="cpu"):
    cfg = read_config(path)
    k_folder = cfg.num_nextn_predict_layers
    state = read_state_dict(path)
    if num_mtp_layers is not None:
        cfg.num_nextn_predict_layers = num_mtp_layers
    k_present = len({m.group(1) for m in map(_MTP_KEY.match, state) if m})
    if k_present < k_folder:
        raise CheckpointError(f"{path}: config says num_nextn_predict_layers={k_folder} "
                              f"but the weights hold {k_present} MTP layers")
    # MTP layers beyond what we keep are dropped on purpose (e.g. draft depth 1 of a K=3 model)
    state = {n: t for n, t in state.items()
             if not ((m := _MTP_KEY.match(n)) and int(m.group(1)) >= cfg.num_nextn_predict_layers)}
    with torch.device(device):
        model = cls(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    _fill_missing_mtp(model, state, min(k_folder, cfg.num_nextn_predict_layers), init_mtp_from)
    expected = {n: t for n, t in model.state_dict().items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensor '{missing[0]}'" if missing else f"unexpected tensor '{unexpected[0]}'"
        more = len(missing) + len(unexpected) - 1
        raise CheckpointError(f"{path}: weights do not match config.json: {what}" + (f" (+{more} more)" if more else ""))
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return model.to(dtype)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_pretrained(model, path) -> None:
    """config.json + model.safetensors in MiMo layout, and the modeling code (see the module docstring).
    Files are written under temporary names and renamed, so a reader never sees a half-written file."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    code = _remote_code(model.config)
    for name, text in code["files"].items():
        _write_atomic(folder / name, text)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    cfg["auto_map"] = code["auto_map"]
    _write_atomic(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True))


def state_checksum(named_tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes: sender and receiver of a weight sync compare it."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
