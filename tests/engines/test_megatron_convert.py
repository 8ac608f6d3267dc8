"""HF/MiMo <-> megatron weight conversion (pure tensor code: runs without megatron-core), and the
one-line error when megatron-core is missing."""

import sys

import pytest
import torch

from verl_mtp.engines import megatron_convert as convert
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config


def _state(**kw):
    torch.manual_seed(0)
    model = MTPCausalLM(toy_config(**kw))
    for p in model.parameters():  # norms start at 1 and biases at 0: make every tensor distinctive
        p.data.normal_()
    return model, model.state_dict()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout", [{}, {"tie_word_embeddings": True}, {"qkv_bias": False},
                                    {"qkv_bias": True, "o_bias": True, "mlp_bias": True}, {"vocab_size": 23}])
@pytest.mark.parametrize("fused_norms", [False, True])
def test_round_trip_is_bitwise(tp, layout, fused_norms):
    model, hf = _state(**layout)
    padded = -(-model.config.vocab_size // tp) * tp
    shards = [convert.to_megatron(hf, model.config, tp, rank, padded, fused_norms=fused_norms) for rank in range(tp)]
    back = convert.to_hf(shards, model.config)
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert torch.equal(back[name], t), name


def test_pipeline_stages_hold_their_own_layers_and_join_back():
    model, hf = _state(num_hidden_layers=4)
    cfg = model.config
    stages = [convert.to_megatron(hf, cfg, layers=range(0, 2)), convert.to_megatron(hf, cfg, layers=range(2, 4))]
    assert torch.equal(stages[1]["decoder.layers.0.mlp.linear_fc2.weight"], hf["model.layers.2.mlp.down_proj.weight"])
    joined = {**convert.to_hf([stages[0]], cfg, layer_offset=0), **convert.to_hf([stages[1]], cfg, layer_offset=2)}
    assert all(torch.equal(joined[k], v) for k, v in hf.items())


def test_fused_layouts_compute_the_same_projections():
    """Not just a permutation that inverts: the fused QKV / gated fc1 / eh_proj compute what HF computes."""
    model, hf = _state()
    cfg, h = model.config, model.config.hidden_size
    x, emb = torch.randn(5, h), torch.randn(5, h)
    layer = model.model.layers[0]
    tp = 2
    shards = [convert.to_megatron(hf, cfg, tp, r) for r in range(tp)]
    d, groups = cfg.head_dim, cfg.num_key_value_heads
    per_group = cfg.num_attention_heads // groups
    q, k, v = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
    for rank, shard in enumerate(shards):  # each rank's fused rows: [q; k; v] of its own KV groups
        qkv = torch.nn.functional.linear(x, shard["decoder.layers.0.self_attention.linear_qkv.weight"],
                                         shard["decoder.layers.0.self_attention.linear_qkv.bias"])
        mine = range(rank * groups // tp, (rank + 1) * groups // tp)
        rows = qkv.view(5, len(mine), per_group + 2, d)
        for j, g in enumerate(mine):
            assert torch.allclose(rows[:, j, :per_group].reshape(5, -1), q.view(5, groups, -1)[:, g], atol=1e-5)
            assert torch.allclose(rows[:, j, per_group], k.view(5, groups, d)[:, g], atol=1e-5)
            assert torch.allclose(rows[:, j, per_group + 1], v.view(5, groups, d)[:, g], atol=1e-5)
    fc1 = torch.cat([torch.nn.functional.linear(x, s["decoder.layers.0.mlp.linear_fc1.weight"]) for s in shards], -1)
    gated = torch.cat([torch.nn.functional.silu(a) * b for a, b in (c.chunk(2, -1) for c in fc1.chunk(tp, -1))], -1)
    assert torch.allclose(gated, torch.nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x), atol=1e-5)
    # MiMo: input_proj(cat(h, emb)); megatron: eh_proj(cat(emb, h))
    mtp = model.model.mtp_layers[0]
    ours = mtp.input_proj(torch.cat([x, emb], -1))
    theirs = torch.cat([torch.nn.functional.linear(torch.cat([emb, x], -1), s["mtp.layers.0.eh_proj.weight"])
                        for s in shards], -1)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_missing_megatron_is_a_one_line_error(monkeypatch):
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "megatron", None)  # `import megatron...` now raises ImportError
    with pytest.raises(ImportError) as err:
        build_engine("megatron", model=MTPCausalLM(toy_config()), optim=None, num_mtp=0)
    message = str(err.value)
    assert "\n" not in message and "pip install" in message and "megatron-core" in message
