"""The MTP policy model: a Qwen2/Llama decoder with K MiMo-style MTP layers, and its HF checkpoint IO."""

from verl_mtp.models.checkpoint import CheckpointError, read_config, state_checksum
from verl_mtp.models.config import ModelConfig, tiny_config
from verl_mtp.models.mtp_model import KVCache, MTPCausalLM, MTPOutput

__all__ = ["CheckpointError", "KVCache", "MTPCausalLM", "MTPOutput", "ModelConfig", "read_config", "state_checksum", "tiny_config"]
