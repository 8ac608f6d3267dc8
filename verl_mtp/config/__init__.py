"""Config tree: Hydra YAML files in this folder backed by the dataclass schemas in schema.py.

Key names are verl's, so verl command lines work unchanged. Typical use:

    cfg = load_config(sys.argv[1:])                  # standalone entry point
    kwargs = resolve_reward_kwargs(cfg)              # what the reward manager receives

or, from a Hydra app:

    @hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=HYDRA_VERSION_BASE)
    def main(cfg):
        cfg = from_hydra(cfg)

Importing this package loads hydra/omegaconf only (no torch, no ray).
"""

from verl_mtp.config.loader import (
    CONFIG_NAME,
    CONFIG_PATH,
    HYDRA_VERSION_BASE,
    from_hydra,
    load_config,
    to_dict,
)
from verl_mtp.config.schema import RLConfig
from verl_mtp.config.validate import (
    ADV_ESTIMATORS,
    KL_ESTIMATORS,
    LOGGERS,
    LOSS_AGG_MODES,
    TRUNCATIONS,
    ConfigError,
    resolve_reward_kwargs,
    validate,
)

__all__ = [
    "ADV_ESTIMATORS",
    "CONFIG_NAME",
    "CONFIG_PATH",
    "HYDRA_VERSION_BASE",
    "KL_ESTIMATORS",
    "LOGGERS",
    "LOSS_AGG_MODES",
    "TRUNCATIONS",
    "ConfigError",
    "RLConfig",
    "from_hydra",
    "load_config",
    "resolve_reward_kwargs",
    "to_dict",
    "validate",
]
