"""DAPO / GRPO with joint MTP training on Ray.

    python -m verl_mtp.trainer.main_dapo [hydra overrides ...]      # or: verl-mtp dapo [overrides ...]
    python -m verl_mtp.trainer.main_dapo --config-name=ppo_megatron_trainer [overrides ...]

Overrides use verl's key names (e.g. `actor_rollout_ref.model.mtp.enable_train=True`). With no
arguments it trains the CPU default: a tiny model on the synthetic math task.
"""

from __future__ import annotations

import sys

from verl_mtp.config import ConfigError, load_config


def parse(argv: list[str]) -> tuple[str, list[str]]:
    """Accept verl's `--config-path=... --config-name=...` flags; the config path is ours."""
    name, overrides = "dapo_trainer", []
    for arg in argv:
        if arg.startswith("--config-name"):
            name = arg.split("=", 1)[1].removesuffix(".yaml")
        elif arg.startswith("--config-path"):
            continue
        else:
            overrides.append(arg)
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name, overrides = parse(argv)
    try:
        cfg = load_config(overrides, config_name=name)
    except ConfigError as e:
        print(f"verl-mtp dapo: {e}", file=sys.stderr)
        return 2
    from verl_mtp.trainer.ray_trainer import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
