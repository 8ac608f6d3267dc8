"""What the device can do, asked in one place by training (engines.core) and rollout (rollout.fast_model):
`bf16_native`, and `native_dtype`, the one rule for a lower-precision setting (`named_dtype` reads one)."""

from __future__ import annotations

import sys

import torch

# the dtype names the config accepts (verl's spellings and the short ones)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def bf16_native(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 arithmetic natively: CUDA's check, or on a CPU oneDNN's (AVX512-BF16
    or AMX); elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def named_dtype(name: str | torch.dtype, key: str) -> torch.dtype:
    """The dtype the setting `key`=`name` names; a ValueError naming the key for anything else."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r}: choose one of {'|'.join(DTYPES)}")
    return DTYPES[name]


_warned: set[str] = set()


def native_dtype(name: str | torch.dtype, device: torch.device, key: str) -> torch.dtype:
    """The dtype to compute in for the setting `key`=`name` on `device`: the requested one where the device
    runs it natively (float32 anywhere, bf16 where `bf16_native`, fp16 on CUDA); elsewhere float32 (an
    emulated bf16 is slower than fp32), with one warning line naming the key, once per setting."""
    dtype = named_dtype(name, key)
    if dtype == torch.float32 or (bf16_native(device) if dtype == torch.bfloat16 else device.type == "cuda"):
        return dtype
    message = f"{key}={name} is not honoured on this {device.type} (no native {name}): computing in float32"
    if message not in _warned:
        _warned.add(message)
        print(f"verl-mtp: warning: {message}", file=sys.stderr, flush=True)
    return torch.float32
