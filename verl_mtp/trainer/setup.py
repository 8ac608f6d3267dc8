"""Turning a config into concrete things for the driver: the tokenizer folder and the synthetic task.
Device, tokenizer and model construction live in models/factory.py (workers need them too); they are
re-exported here for the stage entry points."""

from __future__ import annotations

import os
from pathlib import Path

from verl_mtp.models.factory import build_policy_model, load_tokenizer, num_mtp_layers, resolve_device

__all__ = ["build_policy_model", "ensure_synthetic_task", "load_tokenizer", "num_mtp_layers", "resolve_device",
           "tokenizer_path"]


def tokenizer_path(cfg, run_dir: str) -> str:
    m = cfg.actor_rollout_ref.model
    return m.tokenizer_path or m.path or os.path.join(run_dir, "tokenizer")


def ensure_synthetic_task(cfg, run_dir: str) -> tuple[list[str], list[str]]:
    """`data.train_files: null` means the synthetic math task: written once into the run folder,
    with a tokenizer trained on it when none is configured."""
    from verl_mtp.data.synthetic_math import iter_corpus_text, write_rl_dataset
    from verl_mtp.data.tokenizer import train_tokenizer

    data_dir = Path(run_dir) / "data"
    if not (data_dir / "train.parquet").exists():
        write_rl_dataset(str(data_dir), n_train=4096, n_test=256, seed=cfg.data.seed or 0)
    tok_dir = tokenizer_path(cfg, run_dir)
    if not Path(tok_dir, "tokenizer.json").exists() and not cfg.actor_rollout_ref.model.path:
        train_tokenizer(iter_corpus_text(20000, seed=0), tok_dir)
    return [str(data_dir / "train.parquet")], [str(data_dir / "test.parquet")]
