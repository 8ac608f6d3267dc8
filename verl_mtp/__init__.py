"""verl_mtp: RL post-training for LLMs with first-class multi-token-prediction (MTP) heads.

Importing this package is cheap: ray, megatron and sglang load only where they are used.
"""

__version__ = "0.1.0"
