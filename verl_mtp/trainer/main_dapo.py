"""DAPO / GRPO with joint MTP training on Ray: a Hydra application, like verl's main_ppo.

    verl-mtp dapo [overrides ...]                           # = python -m verl_mtp.trainer.main_dapo
    verl-mtp dapo --config-name=ppo_megatron_trainer key=value ...
    verl-mtp dapo --config-path=$PWD/conf --config-name=my_run   # your YAML; its defaults may list ours
    verl-mtp dapo --cfg job [overrides ...]                 # print the composed config, train nothing

Overrides use verl's key names (e.g. `actor_rollout_ref.model.mtp.enable_train=True`). With no
arguments it trains the CPU default: a tiny model on the synthetic math task.

Hydra's flags work as in any Hydra app: --config-path/-cp, --config-name/-cn, --config-dir/-cd,
--cfg job|hydra|all, --resolve, --package, --info, --help, --hydra-help, hydra.run.dir=... (ours
default to trainer.log_dir, so .hydra/ and the log sit next to metrics.jsonl). Two differences: a
relative --config-path is taken from the current folder (plain Hydra takes it from this file's folder,
inside the installed package), and --multirun is refused, since one process trains one run.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from verl_mtp.algos.dynamic_sampling import FilterGroupsExhausted
from verl_mtp.config import CONFIG_NAME, CONFIG_PATH, HYDRA_VERSION_BASE, ConfigError, from_hydra
from verl_mtp.config.ignored import check_ignored
from verl_mtp.config.loader import check_override_syntax, from_hydra_error
from verl_mtp.config.validate import check_runnable
from verl_mtp.data.rl_dataset import DataError, check_files

PROG = "verl-mtp dapo"
USER_ERRORS = (ConfigError, DataError, FilterGroupsExhausted)  # printed as one line, exit status 2
MULTIRUN = "--multirun is not supported: one process trains one run (start one command per run)"
_started = False  # the task function ran: a Hydra/OmegaConf error after this is the run's, not the composition's


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=HYDRA_VERSION_BASE)
def app(cfg: DictConfig) -> None:
    global _started
    _started = True
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # hydra.mode=MULTIRUN from a YAML or an override
            raise ConfigError(MULTIRUN)
        cfg = from_hydra(cfg)
        check_runnable(cfg)
        check_ignored(cfg)
        _check_data(cfg)
        from verl_mtp.trainer.ray_trainer import run

        run(cfg)
    except USER_ERRORS as e:
        # SystemExit, not an Exception: Hydra's job runner would add a line of its own to an Exception
        print(f"{PROG}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_data(cfg: DictConfig) -> None:
    """Bad rows fail in a second, naming file, row and field, before Ray starts and the model loads."""
    if cfg.data.filter_invalid:  # bad rows are to be skipped (and counted) by the dataset
        return
    for files in (cfg.data.train_files, cfg.data.val_files):
        if files is not None:
            check_files(files, cfg.data.prompt_key)


def parse(argv: list[str]) -> tuple[str, list[str]]:
    """(config name, overrides) of a command line, read by Hydra's own argument parser."""
    args = get_args_parser().parse_args(argv)
    return (args.config_name or CONFIG_NAME).removesuffix(".yaml"), list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    global _started
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)  # a bad flag: Hydra's usage line, exit 2
    if args.multirun:
        print(f"{PROG}: {MULTIRUN}", file=sys.stderr)
        return 2
    if args.help:
        print(__doc__)
    _started = False
    try:
        check_override_syntax(args.overrides)
        with _hydra_argv(_absolute_config_path(argv)):
            app()
    except SystemExit as e:  # ours above, or Hydra's after --help / --info
        return e.code if isinstance(e.code, int) else 1
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        if _started:
            raise
        print(f"{PROG}: {from_hydra_error(e)}", file=sys.stderr)
        return 2
    return 0


@contextmanager
def _hydra_argv(argv: list[str]) -> Iterator[None]:
    """Hand `argv` to @hydra.main (it reads sys.argv), with Hydra's errors raised to us rather than
    printed over several lines (HYDRA_FULL_ERROR), so main() can print them as one."""
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [saved_argv[0] if saved_argv and saved_argv[0] else PROG, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env


def _absolute_config_path(argv: list[str]) -> list[str]:
    """A relative --config-path/-cp made absolute from the current folder (Hydra would look inside
    this package). Both `--config-path DIR` and `--config-path=DIR` forms."""
    out = list(argv)
    for i, arg in enumerate(out):
        for flag in ("--config-path", "-cp"):
            if arg == flag and i + 1 < len(out):
                out[i + 1] = _absolute(out[i + 1])
            elif arg.startswith(flag + "="):
                out[i] = flag + "=" + _absolute(arg.split("=", 1)[1])
    return out


def _absolute(path: str) -> str:
    return path if path.startswith("pkg://") or os.path.isabs(path) else os.path.abspath(path)


if __name__ == "__main__":
    sys.exit(main())
