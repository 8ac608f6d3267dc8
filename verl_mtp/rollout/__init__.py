"""Rollout: the native engine with lossless MTP speculative decoding (and, later, server/SGLang clients)."""

from verl_mtp.rollout.engine import GenerateOutput, NativeEngine, Sample, SpecStats
from verl_mtp.rollout.sampling import SamplingParams, speculative_accept, warp_probs

__all__ = ["GenerateOutput", "NativeEngine", "Sample", "SamplingParams", "SpecStats", "speculative_accept", "warp_probs"]
