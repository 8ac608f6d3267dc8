"""Engine offload between phases: the storage mechanics on real engine tensors (CPU), `offload` /
`reload` as an exact no-op on a CPU device for both engines, and on GPU the freed memory."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.engines.offload import StorageOffload
from tests.engines.test_megatron_engine import _arr, _batch, _engine, _model, train_once


def _offloading_engine(strategy, model, arr):
    """As the worker builds it: each backend takes its own section (actor.megatron / actor.fsdp_config)."""
    return build_engine(strategy, model=copy.deepcopy(model), optim=OmegaConf.to_container(arr.actor.optim),
                        total_steps=10, num_mtp=2, megatron={"param_offload": True, "grad_offload": True},
                        fsdp={"param_offload": True, "optimizer_offload": True})


def _storages(engine):
    params = engine.gpt.parameters() if hasattr(engine, "gpt") else engine.module.parameters()
    return [(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in params]


def test_storage_offload_frees_and_restores_megatron_parameters_and_grad_buffers():
    """The mechanics the GPU path uses, on a CPU megatron engine's own tensors mid-accumulation: storages
    go to zero bytes, and come back with the same values behind the same views (DDP's `main_grad`)."""
    pytest.importorskip("megatron.core")
    arr = _arr()
    engine = _engine("megatron", _model(), arr)
    actor, b = PolicyActor(engine, arr), _batch()
    engine.forward_backward([b.with_(old_log_probs=actor.compute_log_probs(b)[0])],
                            actor._loss_fn(float(b.response_mask.sum()), float(len(b))))
    params = list(engine.gpt.parameters())
    grad_buffers = [buffer.grad_data for buffer in engine.model.buffers]
    before = ([p.detach().clone() for p in params], [p.main_grad.clone() for p in params if p.requires_grad])
    assert any(g.abs().max() > 0 for g in before[1])

    moved = StorageOffload()
    moved.offload(params)
    moved.offload(grad_buffers)
    assert all(p.untyped_storage().nbytes() == 0 for p in params)
    assert all(g.untyped_storage().nbytes() == 0 for g in grad_buffers)
    assert moved.nbytes >= sum(p.numel() * p.element_size() for p in params)
    moved.reload()
    assert all(torch.equal(p, w) for p, w in zip(params, before[0]))
    assert all(torch.equal(p.main_grad, g) for p, g in zip([p for p in params if p.requires_grad], before[1]))

    moved.offload(grad_buffers, keep=False)  # after an optimizer step: nothing to copy, zeros come back
    moved.reload()
    assert all(p.main_grad.abs().max() == 0 for p in params if p.requires_grad)


@pytest.mark.parametrize("strategy", ["torch", "megatron"])
def test_offload_on_a_cpu_device_is_an_exact_no_op(strategy):
    if strategy == "megatron":
        pytest.importorskip("megatron.core")
    model, arr, b = _model(), _arr(), _batch()
    plain, offloading = _engine(strategy, model, arr), _offloading_engine(strategy, model, arr)
    train_once(plain, arr, b)
    train_once(offloading, arr, b)
    storages = _storages(offloading)
    with offloading.offloaded():
        assert _storages(offloading) == storages  # nothing moved: the tensors already live in CPU memory
    offloading.offload()
    after = [train_once(e, arr, b)["weights"] for e in (plain, offloading)]  # the next update, bit for bit
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["torch", "megatron"])
def test_gpu_offload_frees_the_memory_and_reload_restores_the_state(strategy):
    """One GPU: `pytest -m gpu tests/engines/test_engines_offload.py`."""
    if strategy == "megatron":
        pytest.importorskip("megatron.core")
    model, arr, b = _model().cuda(), _arr(), _batch().to("cuda")
    plain, offloading = _engine(strategy, model, arr), _offloading_engine(strategy, model, arr)
    for e in (plain, offloading):
        train_once(e, arr, b)
    params = list(offloading.gpt.parameters() if strategy == "megatron" else offloading.module.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    offloading.offload()
    torch.cuda.synchronize()
    # parameters, plus megatron's fp32 grad buffers or the torch engine's two AdamW moments
    assert held - torch.cuda.memory_allocated() >= 2 * param_bytes
    assert all(p.untyped_storage().nbytes() == 0 for p in params)
    offloading.reload()
    assert torch.cuda.memory_allocated() == held
    after = [train_once(e, arr, b)["weights"] for e in (plain, offloading)]
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])
