"""Run-checkpoint folders on disk: a re-save swaps atomically, pruning follows save order, and a
`latest` pointer that names a missing checkpoint stops a resume with one line."""

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_mtp.config import ConfigError
from verl_mtp.trainer import checkpoint


class Actor:
    """The actor group's side of a save, as far as the folder layout goes: one file of weights."""

    def __init__(self, weights: str):
        self.weights = weights

    def call(self, method: str, folder: str) -> None:
        assert method == "save_checkpoint"
        Path(folder).mkdir()
        (Path(folder) / "weights.txt").write_text(self.weights)

    call_rank0 = call


def _save(root: Path, step: int, weights: str = "w", keep: int | None = None) -> str:
    return checkpoint.save(str(root), step, {"step": step}, Actor(weights), OmegaConf.create({}), keep)


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("global_step_")) for p in root.glob("global_step_*"))


def _auto(root: Path):
    return OmegaConf.create({"resume_mode": "auto", "default_local_dir": str(root), "resume_from_path": None})


def test_a_resave_that_stops_between_its_renames_leaves_that_step_whole(tmp_path, monkeypatch):
    _save(tmp_path, 2, "first")
    real_replace = os.replace

    def dies_on_the_rename_in(src, dst):
        if Path(src).name == ".global_step_2.tmp":
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dies_on_the_rename_in)
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 2, "second")
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    found = checkpoint.find_resume_path(_auto(tmp_path))
    assert (Path(found) / "actor" / "weights.txt").read_text() == "first"

    _save(tmp_path, 2, "third")  # the next save puts the step in place and clears the aside copy
    assert (Path(checkpoint.latest(str(tmp_path))) / "actor" / "weights.txt").read_text() == "third"
    assert not any(p.name.endswith(".old") for p in tmp_path.iterdir())


def test_pruning_keeps_the_newest_saves_not_the_highest_steps(tmp_path):
    for step in (10, 20):
        _save(tmp_path, step, keep=2)
    # a run resumed from an older step (resume_path) saves lower step numbers after higher ones
    _save(tmp_path, 6, keep=2)
    assert _steps(tmp_path) == [6, 20]
    assert checkpoint.latest(str(tmp_path)).endswith("global_step_6")
    _save(tmp_path, 7, keep=2)
    assert _steps(tmp_path) == [6, 7]
    _save(tmp_path, 6, keep=2)  # a re-saved step is the newest save again
    _save(tmp_path, 8, keep=2)
    assert _steps(tmp_path) == [6, 8]


def test_pruning_counts_unrecorded_folders_as_oldest(tmp_path):
    for step in (3, 1):
        _save(tmp_path, step)
    (tmp_path / checkpoint.SAVE_ORDER).unlink()  # e.g. folders written before the record existed
    _save(tmp_path, 2, keep=2)
    assert _steps(tmp_path) == [2, 3]


def test_a_dangling_latest_pointer_is_a_one_line_error(tmp_path):
    _save(tmp_path, 4)
    _save(tmp_path, 5)
    (tmp_path / checkpoint.LATEST).write_text("7")  # e.g. its folder was deleted by hand
    with pytest.raises(ConfigError) as info:
        checkpoint.find_resume_path(_auto(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "global_step_7" in message and "trainer.resume_mode=disable" in message
    disabled = OmegaConf.merge(_auto(tmp_path), {"resume_mode": "disable"})
    assert checkpoint.find_resume_path(disabled) is None


def test_resume_path_without_a_checkpoint_is_a_one_line_error(tmp_path):
    cfg = OmegaConf.merge(_auto(tmp_path), {"resume_mode": "resume_path", "resume_from_path": str(tmp_path / "x")})
    with pytest.raises(ConfigError, match="trainer.resume_from_path"):
        checkpoint.find_resume_path(cfg)
