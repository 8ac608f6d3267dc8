"""The MTP policy model: HF parity, checkpoint round trips, MTP semantics, cached paths, detach."""

import json
import math
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from verl_mtp.algos.mtp_loss import compute_mtp_loss
from verl_mtp.models import CheckpointError, MTPCausalLM, ModelConfig, tiny_config

V = 97


def _small(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_nextn_predict_layers=2, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (3, 13), generator=g)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hf_folder_loads_as_trunk_with_equal_logits(tmp_path, ids, family):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    hf = (Qwen2ForCausalLM(Qwen2Config(**common)) if family == "qwen2"
          else LlamaForCausalLM(LlamaConfig(attention_bias=True, **common))).eval()
    hf.save_pretrained(tmp_path)
    ours = MTPCausalLM.from_pretrained(tmp_path, num_mtp_layers=2).eval()
    assert ours.num_mtp_layers == 2
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask)
    valid = mask.bool()
    assert (ref - out.logits)[valid].abs().max() < 1e-4
    assert len(out.mtp_logits) == 2 and out.mtp_logits[0].shape == ref.shape


def test_save_load_bitwise_and_transformers_reads_our_folder(tmp_path, ids):
    torch.manual_seed(1)
    model = MTPCausalLM(_small()).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["num_nextn_predict_layers"] == 2
    back = MTPCausalLM.from_pretrained(tmp_path)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    names = set(model.state_dict())
    for part in ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm", "self_attn.q_proj",
                 "mlp.gate_proj", "input_layernorm", "post_attention_layernorm"):
        assert any(n.startswith(f"model.mtp_layers.1.{part}") for n in names), part
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_tied_embeddings_round_trip(tmp_path, ids):
    model = MTPCausalLM(_small(tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    back = MTPCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_extra_mtp_layers_copy_first_and_last_layer_init(tmp_path):
    model = MTPCausalLM(_small(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path)
    deeper = MTPCausalLM.from_pretrained(tmp_path, num_mtp_layers=3)
    sd = deeper.state_dict()
    assert torch.equal(sd["model.mtp_layers.2.input_proj.weight"], sd["model.mtp_layers.0.input_proj.weight"])
    trunk_only = MTPCausalLM.from_pretrained(tmp_path, num_mtp_layers=0)
    trunk_only.save_pretrained(tmp_path / "trunk")
    copied = MTPCausalLM.from_pretrained(tmp_path / "trunk", num_mtp_layers=1, init_mtp_from="last_layer")
    assert torch.equal(copied.state_dict()["model.mtp_layers.0.mlp.up_proj.weight"],
                       copied.state_dict()["model.layers.1.mlp.up_proj.weight"])


def test_mtp_logits_predict_token_t_plus_i_plus_2_causally(ids):
    torch.manual_seed(2)
    model = MTPCausalLM(_small()).eval()
    t = 5
    with torch.no_grad():
        base = model(ids)
        for i in range(2):
            changed = ids.clone()
            changed[:, t + i + 2:] = (changed[:, t + i + 2:] + 1) % V  # future of what depth i may read
            out = model(changed)
            assert torch.allclose(out.mtp_logits[i][:, t], base.mtp_logits[i][:, t], atol=1e-6)
            changed = ids.clone()
            changed[:, t + i + 1] = (changed[:, t + i + 1] + 1) % V  # the token it embeds
            assert not torch.allclose(model(changed).mtp_logits[i][:, t], base.mtp_logits[i][:, t])


def test_cached_chunks_match_full_forward(ids):
    torch.manual_seed(3)
    model = MTPCausalLM(_small()).eval()
    b, t = ids.shape
    cache = model.allocate_cache(num_slots=5, max_len=32)
    slots = torch.tensor([4, 0, 2])  # rows need not be contiguous
    pos = torch.arange(t).expand(b, t)
    with torch.no_grad():
        full = model(ids)
        # trunk in two chunks: prefix then one token at a time
        h1 = model.trunk_step(ids[:, :8], pos[:, :8], cache, slots)
        hs = [h1] + [model.trunk_step(ids[:, j:j + 1], pos[:, j:j + 1], cache, slots) for j in range(8, t)]
        hidden = torch.cat(hs, dim=1)
        assert (model.lm_logits(hidden) - full.logits).abs().max() < 1e-5
        # MTP layers chained in chunks: layer i reads h_i and tokens shifted by i+1
        h = hidden
        for i in range(2):
            n = t - i - 1  # positions whose input token exists
            tok = ids[:, i + 1:i + 1 + n]
            a = model.mtp_step(i, h[:, :6], tok[:, :6], pos[:, :6], cache, slots)
            rest = model.mtp_step(i, h[:, 6:n], tok[:, 6:], pos[:, 6:n], cache, slots)
            h = torch.cat([a, rest], dim=1)
            assert (model.lm_logits(h) - full.mtp_logits[i][:, :n]).abs().max() < 1e-5




def test_mtp_chunk_padded_with_scratch_reads_only_real_keys(ids):
    """The engine pads ragged MTP catch-up chunks with a scratch position at the cache's end and passes
    the real key length; real rows must come out as if each had been run alone."""
    torch.manual_seed(5)
    model = MTPCausalLM(_small()).eval()
    b, t = ids.shape
    scratch = 31
    cache = model.allocate_cache(num_slots=b, max_len=scratch + 1)
    slots = torch.arange(b)
    pos = torch.arange(t).expand(b, t)
    with torch.no_grad():
        hidden = model.trunk_step(ids, pos, cache, slots)
        model.mtp_step(0, hidden[:, :6], ids[:, 1:7], pos[:, :6], cache, slots)
        # row r continues with 4 - r real positions from 6; the rest of its chunk is scratch padding
        real = [4 - r for r in range(b)]
        chunk_pos = torch.tensor([[6 + j if j < real[r] else scratch for j in range(4)] for r in range(b)])
        gather = chunk_pos.clamp(max=t - 2)
        out = model.mtp_step(0, hidden[slots[:, None], gather], ids[slots[:, None], gather + 1], chunk_pos,
                             cache, slots, length=10)
        for r in range(b):
            alone = model.mtp_step(0, hidden[r:r + 1, 6:6 + real[r]], ids[r:r + 1, 7:7 + real[r]],
                                   pos[r:r + 1, 6:6 + real[r]], cache, slots[r:r + 1])
            assert torch.allclose(out[r, :real[r]], alone[0], atol=1e-5)
@pytest.mark.parametrize("detach", [True, False])
def test_detach_encoder_keeps_mtp_gradient_off_the_trunk(ids, detach):
    torch.manual_seed(4)
    model = MTPCausalLM(_small())
    out = model(ids, mtp_detach=detach)
    loss, _ = compute_mtp_loss(out.mtp_logits, ids, torch.ones_like(ids), scaling_factor=0.1)
    loss.backward()
    for name, p in model.named_parameters():
        nonzero = p.grad is not None and p.grad.abs().sum() > 0
        if ".mtp_layers." in name:
            assert nonzero, name
        elif detach:
            assert not nonzero, name
    if not detach:
        assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
        assert model.lm_head.weight.grad.abs().sum() > 0


def test_mtp_loss_hand_computed():
    # uniform logits: CE = log V at every target; depth 2 has fewer targets
    logits = [torch.zeros(1, 5, 4), torch.zeros(1, 5, 4)]
    ids = torch.tensor([[0, 1, 2, 3, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    loss, metrics = compute_mtp_loss(logits, ids, mask, scaling_factor=0.5)
    assert math.isclose(float(loss), 0.5 * math.log(4), rel_tol=1e-6)
    assert math.isclose(metrics["mtp/loss_2"], math.log(4), rel_tol=1e-6)
    # a confident correct prediction at the one masked target of depth 1 gives acc 1, CE ~ 0
    logits = torch.full((1, 3, 4), -30.0)
    logits[0, 0, 3] = 30.0  # position 0 predicts token 2 -> 3
    loss, metrics = compute_mtp_loss([logits], torch.tensor([[0, 1, 3]]), torch.tensor([[0, 0, 1]]))
    assert metrics["mtp/acc_1"] == 1.0 and float(loss) < 1e-6


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MTPCausalLM.from_pretrained(tmp_path)
    model = MTPCausalLM(_small())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        MTPCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        MTPCausalLM.from_pretrained(tmp_path)
    cfg["hidden_size"], cfg["num_hidden_layers"] = 32, 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2"):
        MTPCausalLM.from_pretrained(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_tampered_pickle_is_refused(tmp_path):
    model = MTPCausalLM(_small())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        MTPCausalLM.from_pretrained(tmp_path)


def test_tiny_default_is_small():
    model = MTPCausalLM(tiny_config())
    assert model.num_parameters() < 3_000_000


@pytest.mark.parametrize("heads,kv_heads,t", [(4, 2, 1), (4, 2, 3), (4, 4, 2), (8, 2, 5)])
def test_grouped_attention_equals_sdpa(heads, kv_heads, t):
    from verl_mtp.models.mtp_model import grouped_attention

    g = torch.Generator().manual_seed(heads + kv_heads + t)
    b, length, d = 6, 11, 8
    q = torch.randn(b, heads, t, d, generator=g)
    k, v = torch.randn(2, b, kv_heads, length, d, generator=g)
    positions = torch.randint(t - 1, length, (b, 1), generator=g) - torch.arange(t - 1, -1, -1)  # ragged rows
    mask = (torch.arange(length)[None, None, :] <= positions[:, :, None])[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                enable_gqa=heads != kv_heads)
    assert torch.allclose(grouped_attention(q, k, v, mask), expected, atol=1e-5)
