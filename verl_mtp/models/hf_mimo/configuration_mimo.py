"""MiMo's configuration for transformers' `trust_remote_code` loading: Qwen2's fields plus the MTP layers.

verl_mtp:hf_mimo -- written by verl_mtp and copied into every model folder it saves (see modeling_mimo.py).
Only transformers is imported, so the folder loads without verl_mtp installed.
"""

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    num_nextn_predict_layers: int = 1  # K: the MTP layers model.mtp_layers.{0..K-1}
    # Qwen2 has biases on q/k/v only; a model that began as a Llama folder says otherwise here
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False


__all__ = ["MiMoConfig"]
