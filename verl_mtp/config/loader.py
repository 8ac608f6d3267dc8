"""Compose the config with Hydra, standalone or from inside a @hydra.main app."""

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from verl_mtp.config.schema import RLConfig, register_schema
from verl_mtp.config.validate import ConfigError, from_omegaconf, validate

CONFIG_MODULE = "verl_mtp.config"
CONFIG_PATH = "pkg://" + CONFIG_MODULE  # for @hydra.main(config_path=...)
CONFIG_NAME = "dapo_trainer"  # CPU quickstart; "ppo_megatron_trainer" is the cluster base
HYDRA_VERSION_BASE = "1.3"


class BundledConfigs(SearchPathPlugin):
    """Our YAMLs stay findable behind a user's `--config-path`, so their own file may list
    `ppo_megatron_trainer` (or any bundled name) in its `defaults`. Appended after the user's folder:
    a file of theirs with a bundled name wins, as Hydra's search order says."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if all(entry.path != CONFIG_PATH for entry in search_path.get_path()):
            search_path.append(provider="verl_mtp", path=CONFIG_PATH)


register_schema()
Plugins.instance().register(BundledConfigs)


def load_config(
    overrides: Optional[Sequence[str]] = None, config_name: str = CONFIG_NAME, config_path: Optional[str] = None
) -> DictConfig:
    """Compose `config_name` with Hydra command-line style overrides, validate and resolve it.

    `config_path`: a folder of the user's YAML files (searched before ours) or `pkg://module`; None = ours.
    Raises ConfigError (one line naming the key) on unknown keys, wrong types, bad
    override syntax or failed cross-field checks.
    """
    overrides = list(overrides or [])
    check_override_syntax(overrides)
    try:
        with _isolated_hydra(config_path):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise from_hydra_error(err) from err
    return from_hydra(cfg)


def from_hydra(cfg: DictConfig) -> DictConfig:
    """Validate and resolve a config Hydra composed, e.g. the argument of a @hydra.main function."""
    if OmegaConf.get_type(cfg) is not RLConfig:  # a YAML that skipped `defaults: [rl_schema]`
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(RLConfig), cfg)
        except OmegaConfBaseException as err:
            raise from_omegaconf(err) from err
    validate(cfg)
    # Resolve once so workers that receive a sub-tree never chase `${...}` into a missing root.
    OmegaConf.resolve(cfg)
    optim = cfg.actor_rollout_ref.actor.optim
    if optim.warmup_style is not None:  # verl's deprecated alias; readers only look at lr_scheduler_type
        optim.lr_scheduler_type = optim.warmup_style
    if cfg.data.filter_overlong_prompts:  # verl drops over-long prompts before truncation could see them
        cfg.data.truncation = "filter"
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain resolved dict, e.g. for hyper-parameter logging."""
    return OmegaConf.to_container(cfg, resolve=True)


@contextmanager
def _isolated_hydra(config_path: Optional[str] = None) -> Iterator[None]:
    # Inside a @hydra.main app GlobalHydra is already initialized and Hydra refuses a second
    # initialization: park the app's instance, compose with ours, then put it back.
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    path = config_path or CONFIG_PATH
    if path.startswith("pkg://"):
        init = initialize_config_module(config_module=path.removeprefix("pkg://"), version_base=HYDRA_VERSION_BASE)
    else:
        init = initialize_config_dir(config_dir=os.path.abspath(path), version_base=HYDRA_VERSION_BASE)
    try:
        with init:
            yield
    finally:
        restore_gh_from_backup(backup)


def check_override_syntax(overrides: Sequence[str]) -> None:
    """ConfigError naming the key of the first override Hydra's grammar rejects."""
    # Parsing one by one lets the error name the offending key; Hydra's own message does not.
    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_override(line)
        except HydraException as err:  # the grammar's error listener raises the base class
            key = line.split("=", 1)[0].lstrip("+~")
            raise ConfigError(f"key '{key}': cannot parse override {line!r}: {str(err).splitlines()[0]}") from err


def from_hydra_error(err: Exception) -> ConfigError:
    """One line for a Hydra composition error (an OmegaConf cause names the key)."""
    for candidate in (err, err.__cause__):
        if isinstance(candidate, OmegaConfBaseException):
            return from_omegaconf(candidate)
    return ConfigError(str(err).strip().splitlines()[0])
