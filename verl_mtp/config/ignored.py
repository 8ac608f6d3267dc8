"""The keys we accept but do not act on, in ONE table.

They keep verl's names so verl command lines parse unchanged. Each entry says the default (the value at
which ignoring the key changes nothing), what happens at the start of a run when it is set otherwise
(`warn`: one line naming the key; `fail`: a one-line error, where ignoring it would change the result or
the memory used) and why. README's "Coming from verl" section is this table rendered
(`python -m verl_mtp.config.ignored` prints it; tests/config/test_config_keys.py checks they agree), and
the same test fails when a schema key has neither a reader in the package nor an entry here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from omegaconf import DictConfig, OmegaConf

from verl_mtp.config.validate import ConfigError

_ARR = "actor_rollout_ref."


@dataclass(frozen=True)
class Ignored:
    default: Any  # "${key}": the value of that key (the schema's interpolation)
    why: str
    fail: bool = False  # ignoring another value would change the result or the memory used
    strategies: tuple[str, ...] = ()  # ignored only with these actor strategies; () = with every one


_NOT_MEGATRON = ("torch", "fsdp", "fsdp2")  # megatron's engine checks these sizes itself


def _megatron(role: str) -> dict[str, Ignored]:
    m = f"{_ARR}{role}.megatron."
    return {
        m + "virtual_pipeline_model_parallel_size": Ignored(
            None, "only the megatron strategy has pipeline stages", True, _NOT_MEGATRON),
        m + "expert_model_parallel_size": Ignored(
            1, "only the megatron strategy shards experts over ranks; every rank would hold all experts", True,
            _NOT_MEGATRON),
        m + "expert_tensor_parallel_size": Ignored(None, "only the megatron strategy shards experts", True,
                                                   _NOT_MEGATRON),
        m + "use_dist_checkpointing": (
            Ignored(False, "only the megatron strategy writes run checkpoints with megatron's dist_checkpointing",
                    strategies=_NOT_MEGATRON) if role == "actor" else
            Ignored(False, "the reference policy is frozen: it is never checkpointed")),
        m + "dist_checkpointing_path": Ignored(
            None, "initial weights load from model.path (a Hugging Face folder); a run's own sharded checkpoints "
                  "(use_dist_checkpointing) resume from trainer.default_local_dir", True),
        m + "use_mbridge": Ignored(False, "Hugging Face <-> Megatron weights are converted here; same weights"),
        m + "vanilla_mbridge": Ignored(True, "no mbridge (see use_mbridge)"),
        m + "use_remove_padding": Ignored(True, "padding is masked rather than removed; same result"),
        m + "override_ddp_config": Ignored({}, "Megatron's DDP config is built here (fp32 grads, no overlap); "
                                           "other settings would change numerics or memory", True),
        m + "override_mcore_model_config": Ignored({}, "the model is built from its Hugging Face config", True),
    }


IGNORED: dict[str, Ignored] = {
    "data.reward_fn_key": Ignored("data_source", "the data_source column picks the grader", True),
    "data.val_batch_size": Ignored(None, "the validation set goes to the rollout as one batch (verl does the same "
                                         "and deprecated the key)"),
    "data.return_raw_chat": Ignored(True, "the chat messages are always kept next to the token ids"),
    "data.dataloader_num_workers": Ignored(8, "prompts are read and tokenized once, in the driver, at start"),
    _ARR + "model.override_config": Ignored({}, "the model config is read from model.path unchanged", True),
    # the torch and fsdp2 engines recompute; megatron's does not, as verl's megatron workers do not either: a
    # warning, not a failure (memory only, never the result; failing would stop verl's megatron scripts)
    _ARR + "model.enable_gradient_checkpointing": Ignored(
        False, "the megatron engine keeps activations: set megatron.override_transformer_config.recompute_*, as "
               "in verl", strategies=("megatron",)),
    **_megatron("actor"),
    **_megatron("ref"),
    _ARR + "actor.checkpoint.save_contents": Ignored(["model", "optimizer", "extra"],
                                                     "a checkpoint always holds model, optimizer and extra state"),
    _ARR + "actor.checkpoint.load_contents": Ignored(["model", "optimizer", "extra"],
                                                     "a resume always restores model, optimizer and extra state",
                                                     True),
    _ARR + "actor.checkpoint.async_save": Ignored(False, "checkpoints are written synchronously"),
    _ARR + "rollout.prompt_length": Ignored("${data.max_prompt_length}", "the rollout takes data.max_prompt_length",
                                            True),
    _ARR + "rollout.disable_log_stats": Ignored(True, "the engines' own stats logging stays off; rollout metrics "
                                                      "are logged by the trainer"),
    _ARR + "rollout.calculate_log_probs": Ignored(False, "rollouts always return their log-probs"),
    "algorithm.gamma": Ignored(1.0, "only GAE discounts, and there is no critic (grpo|rloo)"),
    "algorithm.lam": Ignored(1.0, "only GAE uses lambda, and there is no critic (grpo|rloo)"),
    "trainer.balance_batch": Ignored(False, "responses are not reordered across ranks by token count; same "
                                            "result, ranks may wait on each other"),
    "trainer.critic_warmup": Ignored(0, "there is no critic; verl would also hold the actor back for these steps",
                                     True),
}


def _default(cfg: DictConfig, entry: Ignored) -> Any:
    d = entry.default
    if isinstance(d, str) and d.startswith("${"):
        return _plain(OmegaConf.select(cfg, d[2:-1]))
    return d


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def ignored_settings(cfg: DictConfig) -> list[tuple[str, Any, Ignored]]:
    """(key, value, entry) of every ignored key `cfg` sets to something other than its default."""
    found, strategy = [], OmegaConf.select(cfg, _ARR + "actor.strategy")
    for key, entry in IGNORED.items():
        value = _plain(OmegaConf.select(cfg, key))
        if value != _default(cfg, entry) and (not entry.strategies or strategy in entry.strategies):
            found.append((key, value, entry))
    return found


def check_ignored(cfg: DictConfig, out: TextIO | None = None) -> None:
    """At the start of a run: ConfigError for the first `fail` key set, then one warning line per `warn` key."""
    settings = ignored_settings(cfg)
    for key, value, entry in settings:
        if entry.fail:
            raise ConfigError(f"key '{key}': {value!r} is not implemented ({entry.why}); "
                              f"remove it or set {_show(_default(cfg, entry))}")
    for key, value, entry in settings:
        print(f"warning: key '{key}'={value!r} is ignored: {entry.why}", file=out or sys.stderr)


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


README_BEGIN = "<!-- generated by `python -m verl_mtp.config.ignored`: edit verl_mtp/config/ignored.py -->"
README_END = "<!-- end of generated section -->"


def render_markdown() -> str:
    """README's "Coming from verl" table: every accepted-but-ignored key."""
    lines = [
        README_BEGIN,
        "Keys verl_mtp accepts (so verl command lines parse) but does not act on. Set to anything but the",
        "default, a *warn* key prints one warning line at start; a *fail* key stops the run at start, because",
        "ignoring it would change the result or the memory used.",
        "",
        "| key | default | if set otherwise | why |",
        "|---|---|---|---|",
    ]
    for key, entry in IGNORED.items():
        default = entry.default if isinstance(entry.default, str) else _show(entry.default)
        only = f" (actor.strategy={'/'.join(entry.strategies)})" if entry.strategies else ""
        lines.append(f"| `{key}` | `{default}` | {'fail' if entry.fail else 'warn'}{only} | {entry.why} |")
    return "\n".join([*lines, README_END])


if __name__ == "__main__":
    print(render_markdown())
