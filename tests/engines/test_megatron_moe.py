"""MoE on the megatron backend: weight conversion both ways (pure tensors), and on CPU megatron-core's
MoE layers against our model: equal logits for trunk and MTP depths, equal load-balancing loss and expert
loads through the router taps, and equal PolicyActor losses, metrics and gradients vs the torch engine
(TP=1 in process; TP=2 logits in subprocesses, this file being their worker script)."""

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from verl_mtp.engines import megatron_convert as convert
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config

REPO = Path(__file__).resolve().parents[2]
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16)
LAYOUTS = [{}, {"first_k_dense_replace": 1}, {"moe_in_mtp": False, "n_shared_experts": 0},
           {"num_experts_per_tok": 1, "norm_topk_prob": False, "tie_word_embeddings": True}]


def _model(**kw) -> MTPCausalLM:
    torch.manual_seed(0)
    return MTPCausalLM(toy_config(**{**MOE, **kw}))


# ---------------------------------------------------------------- conversion (no megatron needed)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fused_norms", [False, True])
def test_round_trip_is_bitwise(tp, layout, fused_norms):
    model = _model(**layout)
    for p in model.parameters():  # make every tensor distinctive
        p.data.normal_()
    hf, cfg = model.state_dict(), model.config
    shards = [convert.to_megatron(hf, cfg, tp, rank, fused_norms=fused_norms) for rank in range(tp)]
    back = convert.to_hf(shards, cfg)
    assert set(back) == set(hf)
    assert all(torch.equal(back[name], t) for name, t in hf.items())
    layer = "decoder.layers.1."
    assert torch.equal(shards[0][layer + "mlp.router.weight"], hf["model.layers.1.mlp.gate.weight"])
    assert layer + "pre_mlp_layernorm.weight" in shards[0]  # an MoE block's norm is its own module, TE or not


def test_expert_shards_compute_the_expert():
    """Not just a permutation that inverts: each TP rank's fused fc1 / fc2 of an expert computes its share."""
    model, tp = _model(), 2
    cfg, x = model.config, torch.randn(5, model.config.hidden_size)
    shards = [convert.to_megatron(model.state_dict(), cfg, tp, r) for r in range(tp)]
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu
    for ours, theirs in ((model.model.layers[1].mlp.experts[2], "decoder.layers.1.mlp.experts.local_experts.2."),
                         (model.model.mtp_layers[0].mlp.shared_experts,
                          "mtp.layers.0.transformer_layer.mlp.shared_experts.")):
        partial = []
        for s in shards:
            gate, up = linear(x, s[theirs + "linear_fc1.weight"]).chunk(2, -1)
            partial.append(linear(silu(gate) * up, s[theirs + "linear_fc2.weight"]))
        assert torch.allclose(sum(partial), ours(x), atol=1e-5)  # row-parallel fc2: the ranks' outputs add up


# ---------------------------------------------------------------- megatron-core on CPU


def _router_tapped(engine):
    """The engine's forward with `RouterTap` read into `MTPOutput.aux_loss` / `.moe_stats` (what
    `MegatronEngine._model_forward` does once it owns a tap; then this is a no-op)."""
    from verl_mtp.engines import megatron_runtime as rt
    from verl_mtp.engines.megatron_engine import left_align

    if getattr(engine, "router_tap", None) is not None:
        return engine
    tap, forward = rt.RouterTap(engine.gpt, engine.hf_config), engine._model_forward

    def forward_with_routing(micro):
        out = forward(micro)
        mask = micro.attention_mask.to(engine.device)
        out.aux_loss, out.moe_stats = tap.collect(left_align(mask, mask)[0].bool())
        return out

    engine._model_forward = forward_with_routing
    return engine


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_aux_loss_and_loads_equal_our_model(layout):
    pytest.importorskip("megatron.core")
    from verl_mtp.engines.base import build_engine
    from tests.engines.test_megatron_engine import _batch, whole_output

    model = _model(**layout)
    engine = _router_tapped(build_engine("megatron", model=copy.deepcopy(model), optim=None, num_mtp=2))
    b = _batch()
    values, out = whole_output(engine, b)
    with torch.no_grad():
        ref = model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, num_mtp=2)
    real = b.attention_mask.bool()
    assert torch.allclose(values["logits"][real], ref.logits[real], atol=1e-4)
    for i, (ours, theirs) in enumerate(zip([values["mtp_0"], values["mtp_1"]], ref.mtp_logits)):
        valid = real[:, :-(i + 1)] & real[:, i + 1:]
        assert torch.allclose(ours[:, :-(i + 1)][valid], theirs[:, :-(i + 1)][valid], atol=1e-4)
    assert out.moe_stats.shape == ref.moe_stats.shape
    assert torch.allclose(out.moe_stats, ref.moe_stats, atol=1e-6)
    assert torch.allclose(out.aux_loss, ref.aux_loss, atol=1e-7)


def test_torch_and_megatron_train_the_same_with_moe():
    pytest.importorskip("megatron.core")
    from tests.engines.test_megatron_engine import _arr, _assert_same_training, _batch, _engine, train_once

    model, arr, b = _model(router_aux_loss_coef=0.1), _arr(), _batch()
    ref = train_once(_engine("torch", model, arr), arr, b)
    ours = train_once(_router_tapped(_engine("megatron", model, arr)), arr, b)
    _assert_same_training(ours, ref)
    moe_keys = [k for k in ref["metrics"] if k.startswith("moe/")]
    assert "moe/aux_loss" in moe_keys and "moe/expert_load_3" in moe_keys and "moe/balance" in moe_keys
    for key in moe_keys:
        assert ours["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-7), key


def test_top1_with_renormalised_weights_is_refused_in_one_line():
    pytest.importorskip("megatron.core")
    from verl_mtp.engines import megatron_runtime as rt

    with pytest.raises(ValueError, match="norm_topk_prob") as err:
        rt.moe_transformer_kwargs(_model(num_experts_per_tok=1).config)
    assert "\n" not in str(err.value)


def _tp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from verl_mtp.engines.base import build_engine
    from tests.engines.test_megatron_engine import _batch, whole_output

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    engine = build_engine("megatron", model=_model(first_k_dense_replace=1), optim=None, num_mtp=2,
                          megatron={"tensor_model_parallel_size": world})
    values, out = whole_output(_router_tapped(engine), _batch())
    if rank == 0:
        torch.save({"logits": values["logits"], "mtp_logits": [values["mtp_0"], values["mtp_1"]],
                    "moe_stats": out.moe_stats},
                   os.path.join(out_dir, "tp.pt"))
    torch.distributed.destroy_process_group()


def test_tensor_parallel_2_experts_give_the_same_logits():
    """Inference only: megatron refuses MoE training under TP without sequence parallel (TE, GPU)."""
    pytest.importorskip("megatron.core")
    from verl_mtp.net import free_port
    from tests.engines.test_megatron_engine import _batch

    world, port = 2, free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), out], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
        logs = [p.communicate(timeout=240)[0].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
        tp = torch.load(os.path.join(out, "tp.pt"), weights_only=True)
    b = _batch()
    with torch.no_grad():
        ref = _model(first_k_dense_replace=1)(b.input_ids, attention_mask=b.attention_mask,
                                              position_ids=b.position_ids)
    real = b.attention_mask.bool()
    assert torch.allclose(tp["logits"][real], ref.logits[real], atol=1e-4)
    valid = real[:, :-1] & real[:, 1:]
    assert torch.allclose(tp["mtp_logits"][0][:, :-1][valid], ref.mtp_logits[0][:, :-1][valid], atol=1e-4)
    assert torch.allclose(tp["moe_stats"], ref.moe_stats, atol=1e-6)


if __name__ == "__main__":
    _tp_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
