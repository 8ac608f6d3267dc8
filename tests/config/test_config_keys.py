"""Every accepted key is read somewhere or listed in config/ignored.py, and the table is honest."""

import dataclasses
import io
import os
import re
import subprocess
import tokenize
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_mtp.config import ConfigError, load_config
from verl_mtp.config.ignored import IGNORED, README_BEGIN, README_END, check_ignored, ignored_settings, render_markdown
from verl_mtp.config.schema import RLConfig
from verl_mtp.config.validate import _strip_optional, schema_type

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "verl_mtp"
# files that only declare or check keys: a mention there is not a reader
NOT_READERS = {"config/schema.py", "config/validate.py", "config/ignored.py"}


def schema_leaves(tp=RLConfig, prefix=""):
    for f in dataclasses.fields(tp):
        sub = _strip_optional(typing.get_type_hints(tp)[f.name])
        if dataclasses.is_dataclass(sub):
            yield from schema_leaves(sub, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def read_names() -> set[str]:
    """Names the package reads as a config field: `x.name`, `x["name"]`, `x.get("name")` (code, not
    comments or docstrings)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if str(path.relative_to(PACKAGE)) in NOT_READERS:
            continue
        previous = None
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.NAME and previous is not None and previous.string == ".":
                names.add(tok.string)
            elif tok.type == tokenize.STRING and previous is not None and previous.string in ("[", "("):
                names.add(tok.string.strip("'\""))
            if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT):
                previous = tok
    return names


def interpolated_keys() -> set[str]:
    """Keys other keys follow by default (`${...}`): read through the interpolation."""
    found = set()

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, str):
                for ref in re.findall(r"\$\{([^}]+)\}", value):
                    found.add(prefix + ref.lstrip(".") if ref.startswith(".") else ref)

    walk(OmegaConf.to_container(OmegaConf.structured(RLConfig), resolve=False), "")
    return found


def test_every_schema_key_is_read_or_listed_as_ignored():
    names, followed = read_names(), interpolated_keys()
    unread = [key for key in schema_leaves()
              if key not in IGNORED and key not in followed and key.rsplit(".", 1)[1] not in names]
    assert unread == [], "keys accepted but never read: list them in verl_mtp/config/ignored.py or honour them"


def test_the_reader_scan_sees_code_not_comments(tmp_path):
    # the scan itself must be able to fail: a key named only in a comment or docstring is unread
    assert "enable_train" in read_names()
    assert "ppo_max_token_len_per_gpu" in read_names()
    assert "Coming" not in read_names()


def test_ignored_keys_are_schema_keys_and_unset_by_default():
    for key in IGNORED:
        assert schema_type(key) is not None, key
    assert ignored_settings(OmegaConf.structured(RLConfig)) == []


@pytest.mark.parametrize("config_name", ["dapo_trainer", "ppo_megatron_trainer", "quickstart_rl"])
def test_bundled_configs_set_no_ignored_key(config_name):
    assert ignored_settings(load_config(["actor_rollout_ref.model.path=/m"], config_name=config_name)) == []


@pytest.mark.parametrize("recipe, config_name", [("dapo_mimo_7b_mtp_megatron_sglang", "ppo_megatron_trainer"),
                                                 ("server_mode_cpu", "dapo_trainer")])
def test_recipes_set_no_ignored_key(recipe, config_name):
    out = subprocess.run(["bash", str(REPO / "recipes" / f"{recipe}.sh")], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert ignored_settings(load_config(out.splitlines(), config_name=config_name)) == []


def test_an_ignored_key_warns_in_one_line():
    out = io.StringIO()
    check_ignored(load_config(["trainer.balance_batch=true", "data.dataloader_num_workers=2"]), out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: key 'data.dataloader_num_workers'=2 is ignored: ")
    assert lines[1].startswith("warning: key 'trainer.balance_batch'=True is ignored: ")


def test_an_ignored_key_that_changes_the_result_fails():
    # load_contents follows save_contents: saving only the model means resuming without the optimizer
    cfg = load_config(["actor_rollout_ref.actor.checkpoint.save_contents=[model]"])
    with pytest.raises(ConfigError, match="key 'actor_rollout_ref.actor.checkpoint.load_contents': \\['model'\\]"):
        check_ignored(cfg, io.StringIO())
    out = io.StringIO()  # loading everything again: only the (harmless) save_contents is ignored
    check_ignored(load_config(["actor_rollout_ref.actor.checkpoint.save_contents=[model]",
                               "actor_rollout_ref.actor.checkpoint.load_contents=[model,optimizer,extra]"]), out)
    assert out.getvalue().startswith("warning: key 'actor_rollout_ref.actor.checkpoint.save_contents'")
    assert out.getvalue().count("\n") == 1


def test_readme_coming_from_verl_is_the_tables_rendering():
    readme = (REPO / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    section = readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)]
    assert section == render_markdown(), "regenerate it: python -m verl_mtp.config.ignored"


def test_filter_overlong_prompts_drops_them_as_truncation_filter_does():
    assert load_config(["data.filter_overlong_prompts=true", "data.truncation=left"]).data.truncation == "filter"
    assert load_config(["data.truncation=left"]).data.truncation == "left"


def test_a_key_ignored_by_some_strategies_only_counts_with_those(monkeypatch):
    from verl_mtp.config import ignored

    monkeypatch.setitem(ignored.IGNORED, "trainer.balance_batch", ignored.Ignored(False, "why", strategies=("torch",)))
    torch = load_config(["trainer.balance_batch=true"])
    assert [key for key, *_ in ignored_settings(torch)] == ["trainer.balance_batch"]
    fsdp = load_config(["trainer.balance_batch=true", "actor_rollout_ref.actor.strategy=fsdp2"])
    assert ignored_settings(fsdp) == []
