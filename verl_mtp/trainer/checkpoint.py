"""Run checkpoints: `{default_local_dir}/global_step_{N}/` with the actor's HF folder (written by rank 0)
and each actor rank's own optimizer and schedule state (`actor/optimizer_rank{r}.pt`), and the driver's
state (step, dataloader position, RNG, KL coefficient, metrics history, config).

A checkpoint is written into a temporary folder and renamed into place (a re-saved step's old folder
is first renamed aside and deleted last), and `latest_checkpointed_iteration.txt` is replaced after
it: a crash at any point leaves a whole checkpoint that `resume_mode=auto` picks. Pruning
(`max_actor_ckpt_to_keep`) keeps the newest saves in the order they were made, recorded in
`checkpoint_save_order.txt`. A `latest` file naming a missing checkpoint stops the run with one line
rather than starting it afresh."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from verl_mtp.config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
SAVE_ORDER = "checkpoint_save_order.txt"  # steps, oldest save first
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


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
    actor_group.call("save_checkpoint", str(tmp / "actor"))  # every rank: collective gather, own optimizer shard
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "rng": _rng_state()}))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    swap_in(tmp, final)
    _write_atomic(root_path / LATEST, str(step))
    _prune(root_path, step, keep)
    return str(final)


def _aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def swap_in(new: Path, folder: Path) -> None:
    """Rename `new` to `folder`. An existing `folder` (a re-saved step) is renamed aside first and deleted
    last, so a crash between the renames still leaves that step whole (`latest` reads the aside copy)."""
    old = _aside(folder)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, step: int, keep: int | None) -> None:
    """Record `step` as the newest save; delete all but the `keep` newest saves. Save order, not step
    number: a run resumed from an older step saves lower steps after higher ones, and the one just
    saved is the one `latest` names. Folders the record lacks count as the oldest."""
    present = {int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))}
    record = root / SAVE_ORDER
    recorded = [int(s) for s in record.read_text().split()] if record.is_file() else []
    order = sorted(present - set(recorded) - {step}) + [s for s in recorded if s in present and s != step] + [step]
    doomed = order[:-keep] if keep and keep > 0 else []
    _write_atomic(record, "\n".join(str(s) for s in order if s not in doomed) + "\n")
    for s in doomed:
        shutil.rmtree(root / f"global_step_{s}", ignore_errors=True)
    for aside in root.glob(".global_step_*.old"):  # left by a re-save that stopped; `latest` names `step` now
        shutil.rmtree(aside, ignore_errors=True)


def latest(root: str) -> str | None:
    """The checkpoint `latest_checkpointed_iteration.txt` names, None when there is no such file."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    step = marker.read_text().strip()
    folder = Path(root) / f"global_step_{step}"
    for candidate in (folder, _aside(folder)):  # the aside copy: a re-save that stopped between its renames
        if (candidate / STATE).is_file():
            return str(candidate)
    raise ConfigError(f"trainer.default_local_dir={root}: {LATEST} names step {step} but {folder} holds no "
                      f"checkpoint; set trainer.resume_mode=disable to start afresh, or resume_mode=resume_path "
                      f"with trainer.resume_from_path")


def find_resume_path(trainer_cfg) -> str | None:
    mode = trainer_cfg.resume_mode
    if mode == "disable":
        return None
    if mode == "resume_path":
        path = trainer_cfg.resume_from_path
        if not (Path(path) / STATE).is_file():
            raise ConfigError(f"key 'trainer.resume_from_path': {path} is not a checkpoint folder (no {STATE})")
        return path
    return latest(trainer_cfg.default_local_dir)


def load(path: str, actor_group) -> dict:
    actor_group.call("load_checkpoint", str(Path(path) / "actor"))
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    _set_rng_state(state.pop("rng"))
    return state
