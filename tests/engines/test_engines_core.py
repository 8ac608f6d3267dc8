"""The training core: each stage's optimizer defaults, the LR schedules, split trunk/MTP clipping, the
skip-on-non-finite update, the atomic checkpoint with a bit-exact resume, pad_batch and the dtype rule."""

import functools

import pytest
import torch
from omegaconf import OmegaConf

from verl_mtp.algos.schedule import lr_lambda
from verl_mtp import device
from verl_mtp.config import load_config
from verl_mtp.engines import core
from verl_mtp.engines.base import build_engine
from verl_mtp.engines.core import (OptimConfig, apply_update, build_optimizer, clip_gradients, clip_groups, clip_norm,
                                   norm_metrics, pad_batch)
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config


def _model(seed=0) -> MTPCausalLM:
    torch.manual_seed(seed)
    return MTPCausalLM(toy_config())


def _hyper(opt) -> list[tuple]:
    return [(len(g["params"]), g["betas"], g["weight_decay"]) for g in opt.param_groups]


def test_each_stage_keeps_its_optimizer_defaults():
    from verl_mtp.trainer import dpo, sft

    model = _model()
    vectors = sum(p.dim() < 2 for p in model.parameters())
    matrices = sum(p.dim() >= 2 for p in model.parameters())
    opt, _ = sft.build_optimizer(model, sft.SFTConfig(weight_decay=0.1))
    assert _hyper(opt) == [(matrices, (0.9, 0.95), 0.1), (vectors, (0.9, 0.95), 0.0)]  # norms are not decayed
    opt, _ = dpo.build_optimizer(model, dpo.DPOConfig(weight_decay=0.05), total_steps=10)
    assert _hyper(opt) == [(matrices, (0.9, 0.999), 0.05), (vectors, (0.9, 0.999), 0.0)]  # AdamW's betas
    arr = load_config(["actor_rollout_ref.actor.optim.betas=[0.8,0.9]",
                       "actor_rollout_ref.actor.optim.weight_decay=0.01"]).actor_rollout_ref
    engine = build_engine("torch", model=model, optim=OmegaConf.to_container(arr.actor.optim), total_steps=10)
    assert _hyper(engine.optimizer) == [(matrices + vectors, (0.8, 0.9), 0.01)]  # verl: one group, all decayed


def test_verl_warmup_ratio_applies_when_warmup_steps_is_negative():
    optim = {"lr": 1.0, "lr_warmup_steps": -1, "lr_warmup_steps_ratio": 0.25, "clip_grad": 2.0}
    cfg = OptimConfig.from_verl(optim, total_steps=40)
    assert (cfg.warmup_steps, cfg.schedule, cfg.clip_grad, cfg.betas) == (10, "constant", 2.0, (0.9, 0.999))


def test_lr_schedules():
    assert lr_lambda(0, 4, 20, "linear", 0.1) == 0.25
    assert lr_lambda(12, 4, 20, "linear", 0.1) == pytest.approx(0.55)
    assert lr_lambda(20, 4, 20, "linear", 0.1) == pytest.approx(0.1)
    assert lr_lambda(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 4, 20, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="unknown LR schedule 'step'"):
        build_optimizer(_model().parameters(), OptimConfig(lr=1.0, schedule="step"))


def _set_grads(model, trunk: float, mtp: float) -> None:
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, mtp if core.MTP_PARAMS in name else trunk)


def test_detached_mtp_gradient_cannot_shrink_the_trunk_step():
    model = _model()
    _set_grads(model, trunk=1e-4, mtp=10.0)  # trunk norm well under the limit, the MTP layers' far over it
    trunk = [p for n, p in model.named_parameters() if core.MTP_PARAMS not in n]
    before = [p.grad.clone() for p in trunk]
    norms = clip_gradients(clip_groups(model.named_parameters(), split=True), functools.partial(clip_norm, max_norm=1.0))
    assert all(torch.equal(p.grad, g) for p, g in zip(trunk, before))  # untouched
    mtp = [p for n, p in model.named_parameters() if core.MTP_PARAMS in n]
    assert norms["mtp"] > 1.0 and clip_norm(mtp, None) == pytest.approx(1.0, rel=1e-4)  # the MTP layers clipped to 1
    metrics = norm_metrics(norms, "train")
    assert metrics["train/grad_norm"] == pytest.approx((norms["trunk"] ** 2 + norms["mtp"] ** 2) ** 0.5)
    assert set(metrics) == {"train/grad_norm", "train/grad_norm_trunk", "train/grad_norm_mtp"}
    # joint clipping (MTP not detached): the same trunk gradient is scaled down by the MTP layers' norm
    _set_grads(model, trunk=1e-4, mtp=10.0)
    clip_gradients(clip_groups(model.named_parameters(), split=False), functools.partial(clip_norm, max_norm=1.0))
    assert trunk[0].grad.abs().max() < 1e-5


def test_sft_step_with_mtp_detach_reports_and_clips_trunk_and_mtp_separately(tmp_path):
    from verl_mtp.trainer import sft

    model = _model()
    ids = torch.randint(1, 24, (3, 10), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    for detach in (False, True):
        cfg = sft.SFTConfig(mtp_detach=detach, grad_clip=1.0, steps=10)
        opt, sched = sft.build_optimizer(model, cfg)
        metrics = sft.train_step(model, opt, sched, [(ids, ones, ones)], cfg)
        assert ("train/grad_norm_trunk" in metrics and "train/grad_norm_mtp" in metrics) is detach


def test_non_finite_gradient_skips_the_update_and_its_schedule_step():
    model = _model()
    opt, sched = build_optimizer(model.parameters(), OptimConfig(lr=1.0, warmup_steps=4, total_steps=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set_grads(model, trunk=float("nan"), mtp=1.0)
    norms = clip_gradients(clip_groups(model.named_parameters(), split=True), functools.partial(clip_norm, max_norm=1.0))
    assert not apply_update(opt, sched, norms)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert sched.last_epoch == 0  # the schedule counts applied updates, as every RL engine does
    _set_grads(model, trunk=1.0, mtp=1.0)
    assert apply_update(opt, sched, {"all": 1.0}) and sched.last_epoch == 1
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _train(model, opt, sched, steps: int) -> list[float]:
    """Steps whose batches come from the global torch RNG, so a resume must restore it too."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, 24, (4, 12))
        out = model(ids, num_mtp=2)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + sum(m.float().pow(2).mean() for m in out.mtp_logits) * 1e-3
        loss.backward()
        groups = clip_groups(model.named_parameters(), split=True)
        apply_update(opt, sched, clip_gradients(groups, functools.partial(clip_norm, max_norm=0.5)))
        losses.append(float(loss.detach()))
    return losses


def test_resume_from_a_checkpoint_is_bit_exact(tmp_path):
    cfg = OptimConfig(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, decay_vectors=False, schedule="cosine",
                      warmup_steps=2, total_steps=6, min_lr_ratio=0.1, clip_grad=0.5)
    torch.manual_seed(1)
    whole = _model()
    losses = _train(whole, *build_optimizer(whole.parameters(), cfg), 6)

    torch.manual_seed(1)
    first = _model()
    opt, sched = build_optimizer(first.parameters(), cfg)
    resumed = _train(first, opt, sched, 3)
    core.save_checkpoint(tmp_path / "ckpt", {"model": core.module_tensors(first)}, opt, sched, {"step": 3})
    torch.manual_seed(123)  # a fresh process: other RNG state, other initial weights
    second = _model(seed=5)
    opt, sched = build_optimizer(second.parameters(), cfg)
    folder = core.find_checkpoint(tmp_path / "ckpt")
    core.load_module_tensors(second, core.read_tensors(folder, "model"), folder)
    assert core.load_checkpoint(folder, opt, sched) == {"step": 3}
    resumed += _train(second, opt, sched, 3)
    assert resumed == losses
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), second.state_dict().values()))


def test_checkpoint_save_is_atomic_and_checks_the_tensors(tmp_path):
    model = _model()
    opt, sched = build_optimizer(model.parameters(), OptimConfig(lr=1.0))
    folder = tmp_path / "ckpt"
    core.save_checkpoint(folder, {"model": core.module_tensors(model)}, opt, sched, {"step": 1})
    core.save_checkpoint(folder, {"model": core.module_tensors(model)}, opt, sched, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folder left
    folder.rename(tmp_path / ".ckpt.old")  # a crash between the two renames of the next save
    assert core.find_checkpoint(folder) == tmp_path / ".ckpt.old"
    assert core.read_state(core.find_checkpoint(folder)) == {"step": 2}
    other = MTPCausalLM(toy_config(num_nextn_predict_layers=1))
    with pytest.raises(core.CheckpointMismatch, match="do not match this model"):
        core.load_module_tensors(other, core.read_tensors(tmp_path / ".ckpt.old", "model"), folder)
    assert core.read_tensors(tmp_path / ".ckpt.old", "ema") is None


def test_pad_batch():
    ids, attention, mask = pad_batch([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]] and mask.dtype == torch.long


def test_compute_dtype_rule(capsys, monkeypatch):
    cpu, key = torch.device("cpu"), "actor_rollout_ref.actor.fsdp_config.dtype"
    assert core.compute_dtype("float32", cpu, key) is None
    monkeypatch.setattr(device, "_warned", set())
    monkeypatch.setattr(device, "bf16_native", lambda device: True)
    assert core.compute_dtype("bfloat16", cpu, key) == torch.bfloat16
    monkeypatch.setattr(device, "bf16_native", lambda device: False)
    for _ in range(2):
        assert core.compute_dtype("bf16", cpu, key) is None
    assert core.compute_dtype("float16", cpu, key) is None  # fp16 only on CUDA
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"verl-mtp: warning: {key}=bf16 is not honoured on this cpu (no native bf16): computing in "
                     "float32", f"verl-mtp: warning: {key}=float16 is not honoured on this cpu (no native float16): "
                     "computing in float32"]  # once per setting
    with pytest.raises(ValueError, match=f"{key}='int8': choose one of"):
        core.compute_dtype("int8", cpu, key)


@pytest.mark.parametrize("strategy", ["torch", "fsdp2"])
def test_a_frozen_engine_names_the_reference_policys_dtype_keys(strategy, capsys, monkeypatch):
    """The ref worker's engine (no optimizer) is configured by actor_rollout_ref.ref.fsdp_config: its messages
    must name that, not the actor's."""
    arr = load_config([]).actor_rollout_ref
    optim = OmegaConf.to_container(arr.actor.optim)
    for frozen, role in ((True, "ref"), (False, "actor")):
        with pytest.raises(ValueError, match=rf"^actor_rollout_ref\.{role}\.fsdp_config\.model_dtype='int8': "):
            build_engine(strategy, model=_model(), optim=None if frozen else optim, fsdp={"model_dtype": "int8"})
    monkeypatch.setattr(device, "_warned", set())
    monkeypatch.setattr(device, "bf16_native", lambda device: False)
    engine = build_engine("torch", model=_model(), optim=None, fsdp={"dtype": "bf16"})
    assert engine.compute_dtype is None
    assert capsys.readouterr().err.startswith("verl-mtp: warning: actor_rollout_ref.ref.fsdp_config.dtype=bf16 ")


@pytest.mark.skipif(not device.bf16_native(torch.device("cpu")), reason="this CPU has no native bf16")
def test_torch_engine_trains_in_bf16_with_fp32_master_weights():
    from verl_mtp.engines.actor import PolicyActor
    from tests.engines.test_engines_actor import _batch

    arr = load_config(["actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.model.mtp.num_layers=2",
                       "actor_rollout_ref.actor.fsdp_config.dtype=bfloat16"]).actor_rollout_ref
    actors = {}
    for dtype in ("float32", "bfloat16"):
        model = _model()
        fsdp = {**OmegaConf.to_container(arr.actor.fsdp_config), "dtype": dtype}
        engine = build_engine("torch", model=model, optim=OmegaConf.to_container(arr.actor.optim), total_steps=4,
                              num_mtp=2, fsdp=fsdp)
        actors[dtype] = PolicyActor(engine, arr, temperature=1.0)
    assert actors["float32"].engine.compute_dtype is None
    assert actors["bfloat16"].engine.compute_dtype == torch.bfloat16
    batch = _batch()
    lp32, _ = actors["float32"].compute_log_probs(batch, micro_size=4)
    lp16, _ = actors["bfloat16"].compute_log_probs(batch, micro_size=4)
    assert lp16.dtype == torch.float32 and not torch.equal(lp16, lp32)  # bf16 arithmetic, fp32 log-probs
    assert torch.allclose(lp16, lp32, atol=0.1)
    metrics = actors["bfloat16"].update_policy(batch.with_(old_log_probs=lp16), 6)
    assert metrics["actor/nan_skipped_updates"] == 0 and metrics["mtp/loss"] > 0
    module = actors["bfloat16"].engine.module
    assert all(p.dtype == torch.float32 for p in module.parameters())  # the master weights AdamW updates
    assert not torch.equal(module.lm_head.weight, actors["float32"].engine.module.lm_head.weight)  # it trained
