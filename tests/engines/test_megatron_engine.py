"""The megatron engine against our model and the torch engine, on CPU: equal logits (trunk and MTP
depths), equal policy/MTP losses and gradients through PolicyActor, detached MTP heads, TP=2 over gloo
(this file is also the TP worker script), weights out and back, clipping groups. PP/TE paths are GPU-only;
context parallel is in test_megatron_context_parallel.py, offload in test_engines_offload.py."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("megatron.core")

from verl_mtp.batch import from_samples  # noqa: E402
from verl_mtp.config import load_config  # noqa: E402
from verl_mtp.engines.actor import PolicyActor  # noqa: E402
from verl_mtp.engines.base import MicroBatchFn, build_engine  # noqa: E402
from verl_mtp.models import MTPCausalLM  # noqa: E402
from tests.conftest import toy_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _arr(**over):
    args = [f"{k}={v}" for k, v in over.items()]
    return load_config(["actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.optim.clip_grad=1e9",
                        "actor_rollout_ref.model.mtp.num_layers=2",
                        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", *args]).actor_rollout_ref


def _batch(seed=0, rows=6, zero_advantages=False):
    """Prompts of >= 3 tokens: with K=2 MTP layers every MTP target is then predicted from a real token.
    (A target predicted from a pad position is read from padding garbage, which the two layouts fill
    differently; see docs/megatron.md.)"""
    g = torch.Generator().manual_seed(seed)
    lengths = lambda lo, hi: [int(torch.randint(lo, hi, (1,), generator=g)) for _ in range(rows)]  # noqa: E731
    prompts = [torch.randint(1, 24, (n,), generator=g).tolist() for n in lengths(3, 7)]
    responses = [torch.randint(1, 24, (n,), generator=g).tolist() for n in lengths(1, 7)]
    b = from_samples(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0)
    adv = torch.zeros(b.responses.shape) if zero_advantages else torch.randn(b.responses.shape, generator=g)
    return b.with_(advantages=adv * b.response_mask)


def _model(**kw):
    torch.manual_seed(0)
    return MTPCausalLM(toy_config(**kw))


def _engine(strategy, model, arr, detach=True, megatron=None):
    kwargs = {"megatron": megatron} if megatron else {}
    return build_engine(strategy, model=copy.deepcopy(model), optim=OmegaConf.to_container(arr.actor.optim),
                        total_steps=10, num_mtp=2, mtp_detach=detach, mtp_lr_scale=arr.model.mtp.lr_scale, **kwargs)


def whole_output(engine, batch):
    """Every position's trunk logits, hidden states and MTP logits in the batch's layout (gathered over
    CP ranks), and this rank's MTPOutput for its sequence-level fields."""
    def per_token(out, _):
        return {"logits": out.logits, "hidden_states": out.hidden_states,
                **{f"mtp_{i}": x for i, x in enumerate(out.mtp_logits)}}

    values, out = engine.infer([batch], MicroBatchFn(per_token, lambda values, out, _: (values, out)))[0]
    return values, out


def _grads(engine):
    if hasattr(engine, "named_grads"):
        return engine.named_grads()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
            for n, p in engine.module.named_parameters()}


def train_once(engine, arr, batch):
    """Old log-probs, then one PPO mini-batch (3 micro-batches): what the engine computed on the way."""
    actor = PolicyActor(engine, arr)
    log_probs, _ = actor.compute_log_probs(batch, micro_size=4)
    grads = {}
    step = engine.optimizer_step

    def record_then_step():
        grads.update(_grads(engine))
        return step()

    engine.optimizer_step = record_then_step
    metrics = actor.update_policy(batch.with_(old_log_probs=log_probs), mini_batch_rows=len(batch))
    weights = {k: v.detach().clone() for k, v in engine.named_tensors()}
    return {"log_probs": log_probs * batch.response_mask, "metrics": metrics, "grads": grads, "weights": weights}


def _assert_same_training(ours, ref):
    assert torch.allclose(ours["log_probs"], ref["log_probs"], atol=1e-5)
    for key in ("actor/pg_loss", "mtp/loss", "mtp/loss_1", "mtp/loss_2", "actor/grad_norm", "actor/grad_norm_trunk",
                "actor/grad_norm_mtp"):
        assert ours["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-6), key
    assert ours["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert torch.allclose(ours["grads"][name], g, atol=1e-6, rtol=1e-4), name
    for name, w in ref["weights"].items():  # after one AdamW step
        assert torch.allclose(ours["weights"][name], w, atol=1e-4), name


# ---------------------------------------------------------------- TP=1, in process


@pytest.mark.parametrize("layout", [{}, {"tie_word_embeddings": True, "vocab_size": 25},
                                    {"qkv_bias": False, "num_key_value_heads": 4}])
def test_logits_equal_our_model_for_trunk_and_every_mtp_depth(layout):
    model = _model(**layout)
    engine = build_engine("megatron", model=copy.deepcopy(model), optim=None, num_mtp=2)
    b = _batch()
    out, _ = whole_output(engine, b)
    with torch.no_grad():
        ref = model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, num_mtp=2)
    real = b.attention_mask.bool()
    assert torch.allclose(out["logits"][real], ref.logits[real], atol=1e-4)
    assert torch.allclose(out["hidden_states"][real], ref.hidden_states[real], atol=1e-4)
    for i, (ours, theirs) in enumerate(zip([out["mtp_0"], out["mtp_1"]], ref.mtp_logits)):
        shift = i + 1  # depth i at t reads tokens up to t+i+1: both must be real
        valid = real[:, :-shift] & real[:, shift:]
        assert torch.allclose(ours[:, :-shift][valid], theirs[:, :-shift][valid], atol=1e-4)


def test_torch_and_megatron_give_the_same_losses_and_gradients():
    model, arr, b = _model(), _arr(), _batch()
    ref = train_once(_engine("torch", model, arr), arr, b)
    _assert_same_training(train_once(_engine("megatron", model, arr), arr, b), ref)


@pytest.mark.parametrize("detach", [True, False])
def test_with_zero_advantage_only_mtp_params_get_gradients_when_detached(detach):
    arr = _arr()
    grads = train_once(_engine("megatron", _model(), arr, detach=detach), arr, _batch(zero_advantages=True))["grads"]
    learning = {n for n, g in grads.items() if g.abs().max() > 0}
    assert any(".mtp_layers." in n for n in learning)
    trunk = {n for n in learning if ".mtp_layers." not in n}
    assert (not trunk) if detach else trunk


@pytest.mark.parametrize("detach", [True, False])
def test_trunk_and_mtp_grad_norms_equal_the_torch_engines_and_clip_separately_when_detached(detach):
    """Both engines clip the trunk and the detached MTP layers each to clip_grad (jointly when not
    detached) and report the norms before clipping; with a clip that bites, the weights after the step
    still agree."""
    model, b = _model(), _batch()
    arr = _arr(**{"actor_rollout_ref.actor.optim.clip_grad": 0.05})
    results = [train_once(_engine(s, model, arr, detach=detach), arr, b) for s in ("torch", "megatron")]
    ref, ours = (r["metrics"] for r in results)
    split = ("actor/grad_norm_trunk", "actor/grad_norm_mtp")
    assert all((k in ours) == detach for k in split)
    for key in ("actor/grad_norm", *(split if detach else ())):
        assert ours[key] == pytest.approx(ref[key], rel=1e-5), key
        assert ours[key] > 0.05  # the clip bites
    if detach:
        assert ours["actor/grad_norm"] == pytest.approx(math.hypot(*(ours[k] for k in split)), rel=1e-9)
    for name, w in results[0]["weights"].items():
        assert torch.allclose(results[1]["weights"][name], w, atol=1e-4), name


def test_detached_mtp_gradient_does_not_shrink_the_policy_update():
    """A huge MTP loss leaves the trunk's step bit for bit unchanged: clipped on its own."""
    model, b = _model(), _batch()
    trunk_after = []
    for scale in (0.1, 1000.0):
        arr = _arr(**{"actor_rollout_ref.actor.optim.clip_grad": 1.0,
                      "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor": scale})
        weights = train_once(_engine("megatron", model, arr), arr, b)["weights"]
        trunk_after.append({n: w for n, w in weights.items() if ".mtp_layers." not in n})
    assert all(torch.equal(trunk_after[0][n], trunk_after[1][n]) for n in trunk_after[0])


@pytest.mark.parametrize("strategy", ["torch", "megatron"])
def test_mtp_lr_scale_scales_only_the_mtp_layers_step(strategy):
    """model.mtp.lr_scale=4: AdamW's step (its decoupled decay too) is proportional to the lr, so after one
    step every MTP tensor has moved exactly 4x as far as with scale 1 and the trunk exactly as far."""
    model, b = _model(), _batch()
    before = dict(model.state_dict())
    moved = {}
    for scale in (1.0, 4.0):
        arr = _arr(**{"actor_rollout_ref.model.mtp.lr_scale": scale, "actor_rollout_ref.actor.optim.weight_decay": 0.1})
        weights = train_once(_engine(strategy, model, arr), arr, b)["weights"]
        moved[scale] = {n: w - before[n] for n, w in weights.items()}
    mtp = [n for n in moved[1.0] if ".mtp_layers." in n and moved[1.0][n].abs().max() > 0]
    trunk = [n for n in moved[1.0] if ".mtp_layers." not in n]
    assert mtp and trunk
    for n in mtp:
        assert torch.allclose(moved[4.0][n], 4 * moved[1.0][n], rtol=1e-3, atol=1e-7), n
    for n in trunk:
        assert torch.allclose(moved[4.0][n], moved[1.0][n], rtol=1e-4, atol=1e-8), n


def test_weights_checkpoint_and_resume_round_trip(tmp_path):
    model, arr, b = _model(), _arr(), _batch()
    engine = _engine("megatron", model, arr)
    assert {k: torch.equal(v, model.state_dict()[k]) for k, v in engine.named_tensors()} == \
        {k: True for k in model.state_dict()}
    train_once(engine, arr, b)
    engine.save_hf(str(tmp_path))
    saved = MTPCausalLM.from_pretrained(str(tmp_path)).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in engine.named_tensors())
    resumed = _engine("megatron", model, arr)
    resumed.load_state_dict(copy.deepcopy(engine.state_dict()))  # as if through a file
    assert resumed.lr == engine.lr
    loss = MicroBatchFn(lambda out, _: {"lse": out.logits.logsumexp(-1), "mtp": out.mtp_logits[1].mean(-1)},
                        lambda values, out, _: (values["lse"].mean() + values["mtp"].mean(), {}))
    for e in (engine, resumed):  # the next update agrees bit for bit: weights, Adam moments and step restored
        e.forward_backward([b], loss)
        e.optimizer_step()
    after = [dict(e.named_tensors()) for e in (engine, resumed)]
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])


# ---------------------------------------------------------------- TP=2 over gloo, in subprocesses


def _worker(rank: int, world: int, port: int, out_dir: str, megatron: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    arr = _arr()
    engine = _engine("megatron", _model(), arr, megatron=json.loads(megatron))
    result = train_once(engine, arr, _batch())
    engine.save_checkpoint(os.path.join(out_dir, "dist"))  # megatron's dist_checkpointing, every rank its shards
    own = {k: v for k, v in engine.state_dict().items() if k != "model"}  # gathers the model: every rank
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
        torch.save(own, os.path.join(out_dir, "rank0.pt"))
    torch.distributed.destroy_process_group()


def run_two_ranks(out: Path, megatron: dict) -> Path:
    """One PPO update on 2 ranks over gloo (two processes): rank 0's results, the run's dist checkpoint
    and rank 0's optimizer file, in `out`."""
    from verl_mtp.net import free_port

    world, port = 2, free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    args = [str(world), str(port), str(out), json.dumps(megatron)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


@pytest.fixture(scope="module")
def tensor_parallel_2(tmp_path_factory):
    return run_two_ranks(tmp_path_factory.mktemp("tp2"), {"tensor_model_parallel_size": 2})


def test_tensor_parallel_2_matches_the_torch_engine(tensor_parallel_2):
    model, arr, b = _model(), _arr(), _batch()
    _assert_same_training(torch.load(tensor_parallel_2 / "result.pt", weights_only=False),
                          train_once(_engine("torch", model, arr), arr, b))


def test_pipeline_parallel_2_on_cpu_matches_the_torch_engine(tmp_path):
    """megatron's 1F1B schedule over gloo: the trunk split over two stages, the MTP layers (and their copy of
    the word embeddings) on the last, p2p activations both ways; log-probs (forward-only schedule),
    losses, grad norms, gradients and the stepped weights equal the torch engine's."""
    out = run_two_ranks(tmp_path, {"pipeline_model_parallel_size": 2})
    model, arr, b = _model(), _arr(), _batch()
    _assert_same_training(torch.load(out / "result.pt", weights_only=False),
                          train_once(_engine("torch", model, arr), arr, b))


def test_dist_checkpoint_saved_at_tp_2_resumes_at_tp_1_and_per_rank_files_are_refused(tensor_parallel_2):
    """megatron's dist_checkpointing reshards: a TP=1 engine reads the TP=2 run's model and Adam moments and
    takes the same next step as a TP=1 engine that ran the first step itself. Our per-rank optimizer files
    cannot be resharded: loading one at another TP size is refused in one line naming the key and both sizes."""
    model, arr, b = _model(), _arr(), _batch()
    tp = torch.load(tensor_parallel_2 / "result.pt", weights_only=False)
    resumed = _engine("megatron", model, arr)
    resumed.load_checkpoint(str(tensor_parallel_2 / "dist"))
    assert all(torch.equal(v, tp["weights"][k]) for k, v in resumed.named_tensors())
    assert resumed.lr == pytest.approx(arr.actor.optim.lr)
    ran = _engine("megatron", model, arr)
    train_once(ran, arr, b)
    before = {k: v.clone() for k, v in ran.named_tensors()}
    after = [train_once(e, arr, _batch(seed=1))["weights"] for e in (resumed, ran)]
    for k in before:  # the step itself (not the weights it starts from) agrees: moments and step count read back
        assert torch.allclose(after[0][k] - tp["weights"][k], after[1][k] - before[k], atol=1e-5), k
    per_rank = torch.load(tensor_parallel_2 / "rank0.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.actor\.megatron\.tensor_model_parallel_size=1, but "
                                         r"the checkpoint's optimizer shards were saved at 2: [^\n]+$"):
        _engine("megatron", model, arr).load_state_dict({"model": tp["weights"], **per_rank})


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("megatron", [{"pipeline_model_parallel_size": 2},
                                      {"tensor_model_parallel_size": 2, "sequence_parallel": True},
                                      {"tensor_model_parallel_size": 2, "optimizer_offload": True}])
def test_gpu_parallel_layouts_match_the_torch_engine(megatron):
    """2 GPUs under torchrun: `torchrun --nproc-per-node 2 -m pytest -m gpu tests/engines/test_megatron_engine.py`.
    megatron's pipeline schedules and optimizers allocate on CUDA; sequence parallel needs the TE spec."""
    assert_megatron_trains_like_torch_on_gpus(megatron)


def assert_megatron_trains_like_torch_on_gpus(megatron: dict) -> None:
    """Under torchrun on 2 GPUs: one PPO update with the megatron engine (the given parallel keys) equals
    the torch engine's on the same model and batch."""
    if not torch.distributed.is_torchelastic_launched():
        pytest.skip("run under torchrun with 2 GPUs")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl")
    torch.cuda.set_device(torch.distributed.get_rank())
    model, arr, b = _model(), _arr(), _batch().to("cuda")
    ref = train_once(_engine("torch", model.cuda(), arr), arr, b)
    _assert_same_training(train_once(_engine("megatron", model, arr, megatron=megatron), arr, b), ref)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
