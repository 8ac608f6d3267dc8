"""Folders we save load in plain transformers (`trust_remote_code`) with the trunk and every MTP layer, and a
MiMo folder's own modeling code survives a load/save through us."""

import ast
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from verl_mtp.models import MTPCausalLM, ModelConfig

V = 61
HF_CODE = Path(__file__).parents[2] / "verl_mtp" / "models" / "hf_mimo"


def _model(**kw) -> MTPCausalLM:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_nextn_predict_layers=3, max_position_embeddings=64)
    torch.manual_seed(0)
    model = MTPCausalLM(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # norms and biases away from their init, so a mix-up of two of them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_shipped_files_import_only_torch_transformers_and_each_other():
    """Users load a saved folder without verl_mtp installed."""
    for f in HF_CODE.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 or isinstance(node, ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert all(n.split(".")[0] in ("torch", "transformers", "dataclasses", "__future__") for n in names), \
                    f"{f.name}: imports {names}"


def _load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.mark.parametrize("variant", [{}, {"tie_word_embeddings": True},
                                     {"qkv_bias": False, "o_bias": True, "mlp_bias": True}],
                         ids=["qwen2", "tied", "llama_biases"])
def test_auto_model_runs_trunk_and_every_mtp_layer_as_we_do(tmp_path, variant):
    ours = _model(**variant)
    ours.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert (config.model_type, config.num_nextn_predict_layers) == ("mimo", 3)
    hf = _load(tmp_path)
    assert type(hf).__name__ == "MiMoForCausalLM"
    own = {n: t for n, t in ours.state_dict().items()}
    theirs = hf.state_dict()
    assert set(theirs) == set(own)
    assert all(torch.equal(theirs[n], t) for n, t in own.items())

    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ours(ids, attention_mask=mask)
        got = hf(ids, attention_mask=mask, position_ids=positions, return_mtp_logits=True)
        trunk_only = hf(ids, attention_mask=mask, position_ids=positions)
    valid = mask.bool()
    assert (got.logits - want.logits)[valid].abs().max() < 1e-5
    assert (trunk_only.logits - want.logits)[valid].abs().max() < 1e-5
    assert len(got.mtp_logits) == 3
    for i, (g, w) in enumerate(zip(got.mtp_logits, want.mtp_logits)):
        assert g.shape == w.shape
        assert (g - w)[valid].abs().max() < 1e-5, f"MTP layer {i}"


def test_generate_runs_the_trunk_with_a_cache_greedy_as_we_do(tmp_path):
    ours = _model()
    ours.save_pretrained(tmp_path)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    got = _load(tmp_path).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = prompt
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, ours(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)


def test_moe_folder_config_loads_and_the_model_refuses_in_one_line(tmp_path):
    _model(n_routed_experts=4, num_experts_per_tok=2, num_nextn_predict_layers=1).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path, trust_remote_code=True).n_routed_experts == 4
    with pytest.raises(ValueError, match="n_routed_experts=4"):
        _load(tmp_path)


def _mimo_release(folder: Path) -> dict:
    """A stand-in for a MiMo release folder: weights in MiMo layout, with modeling code and an auto_map that
    are not ours (our files with the mark removed, under other names)."""
    _model(num_nextn_predict_layers=1).save_pretrained(folder)
    for f in folder.glob("*.py"):
        f.unlink()
    for f in HF_CODE.glob("*.py"):
        text = f.read_text().replace("verl_mtp:hf_mimo", "release code")
        (folder / f"{f.stem}_release.py").write_text(text.replace(".configuration_mimo", ".configuration_mimo_release"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_mimo_release.MiMoConfig",
                       "AutoModelForCausalLM": "modeling_mimo_release.MiMoForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg["auto_map"]


def test_a_mimo_folders_own_code_and_auto_map_are_kept(tmp_path):
    auto_map = _mimo_release(tmp_path / "release")
    MTPCausalLM.from_pretrained(tmp_path / "release", num_mtp_layers=2).save_pretrained(tmp_path / "ours")
    saved = tmp_path / "ours"
    assert json.loads((saved / "config.json").read_text())["auto_map"] == auto_map
    assert sorted(p.name for p in saved.glob("*.py")) == ["configuration_mimo_release.py", "modeling_mimo_release.py"]
    for f in saved.glob("*.py"):
        assert f.read_text() == (tmp_path / "release" / f.name).read_text()
    assert type(_load(saved)).__name__ == "MiMoForCausalLM"


def test_a_folder_we_saved_gets_todays_code_on_resave(tmp_path):
    _model(num_nextn_predict_layers=1).save_pretrained(tmp_path / "old")
    stale = tmp_path / "old" / "modeling_mimo.py"
    stale.write_text(stale.read_text() + "\n# an older verl_mtp's version\n")
    MTPCausalLM.from_pretrained(tmp_path / "old").save_pretrained(tmp_path / "new")
    for f in HF_CODE.glob("*.py"):
        assert (tmp_path / "new" / f.name).read_text() == f.read_text()
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mimo.MiMoForCausalLM"
