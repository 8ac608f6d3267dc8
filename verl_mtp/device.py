"""What the device can do, asked in one place by training (engines.core) and rollout (rollout.fast_model)."""

from __future__ import annotations

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
