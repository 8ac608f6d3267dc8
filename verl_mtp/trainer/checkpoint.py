"""Run checkpoints: `{default_local_dir}/global_step_{N}/` with the actor's HF folder and optimizer,
and the driver's state (step, dataloader position, RNG, KL coefficient, metrics history, config).

A checkpoint is written into a temporary folder and renamed into place, and
`latest_checkpointed_iteration.txt` is replaced last: a crash at any point leaves the previous
checkpoint intact and still the one `resume_mode=auto` picks."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

LATEST = "latest_checkpointed_iteration.txt"


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: dict) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: str, step: int, trainer_state: dict, actor_group, cfg, keep: int | None) -> str:
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    final = root_path / f"global_step_{step}"
    tmp = root_path / f".global_step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    actor_group.call_rank0("save_checkpoint", str(tmp / "actor"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "rng": _rng_state()}))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if final.exists():  # re-saving a step (after a recovery): replace it as a whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root_path / LATEST, str(step))
    _prune(root_path, keep)
    return str(final)


def _prune(root: Path, keep: int | None) -> None:
    if not keep or keep <= 0:
        return
    steps = sorted(int(p.name.split("_")[-1]) for p in root.glob("global_step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(root / f"global_step_{old}", ignore_errors=True)


def latest(root: str) -> str | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    folder = Path(root) / f"global_step_{marker.read_text().strip()}"
    return str(folder) if (folder / "trainer_state.json").is_file() else None


def find_resume_path(trainer_cfg) -> str | None:
    mode = trainer_cfg.resume_mode
    if mode == "disable":
        return None
    if mode == "resume_path":
        path = trainer_cfg.resume_from_path
        if not (Path(path) / "trainer_state.json").is_file():
            raise FileNotFoundError(f"trainer.resume_from_path={path}: not a checkpoint folder (no trainer_state.json)")
        return path
    return latest(trainer_cfg.default_local_dir)


def load(path: str, actor_group) -> dict:
    actor_group.call("load_checkpoint", str(Path(path) / "actor"))
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    _set_rng_state(state.pop("rng"))
    return state
