"""The FSDP2 engine at 2 ranks over gloo (CPU) against the single-process torch engine, and the global
token normalisation of the PPO loss on FSDP2 and DDP.

One spawn of 2 ranks runs every scenario (module fixture `two_ranks`); each rank trains on its half of
a batch whose long responses all fall on rank 0, so a loss normalised by each rank's own token count
would not match the single process. The tests compare what the ranks recorded with the torch engine
on the whole batch in this process: log-probs, losses, gradients and weights after one AdamW step."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from verl_mtp.batch import from_samples
from verl_mtp.config import load_config
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import MicroBatchFn, build_engine
from verl_mtp.device import bf16_native
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config

WORLD = 2
MODES = ("token-mean", "seq-mean-token-mean")


def _arr(mode="token-mean", *overrides):
    return load_config(["actor_rollout_ref.actor.optim.lr=1e-2", "actor_rollout_ref.actor.optim.clip_grad=1e9",
                        "actor_rollout_ref.model.mtp.num_layers=2", f"actor_rollout_ref.actor.loss_agg_mode={mode}",
                        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", *overrides]).actor_rollout_ref


def _batch():
    """6 rows; rank 0 gets rows 0-2 (responses of 6, 5, 6 tokens), rank 1 rows 3-5 (1, 2, 1)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 24, (n,), generator=g).tolist() for n in (4, 3, 5, 4, 3, 5)]
    responses = [torch.randint(1, 24, (n,), generator=g).tolist() for n in (6, 5, 6, 1, 2, 1)]
    b = from_samples(prompts, responses, [[0.0] * len(r) for r in responses], pad_id=0)
    return b.with_(advantages=torch.randn(b.responses.shape, generator=g) * b.response_mask)


def _shard(batch, rank):
    rows = len(batch) // WORLD
    return batch.select(torch.arange(rank * rows, (rank + 1) * rows))


def _model():
    torch.manual_seed(0)
    return MTPCausalLM(toy_config())


def _engine(strategy, arr, **kw):
    return build_engine(strategy, model=_model(), optim=OmegaConf.to_container(arr.actor.optim), total_steps=10,
                        num_mtp=2, mtp_detach=True, **kw)


def _full_grads(engine):
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {n: full(p.grad).clone() if p.grad is not None else torch.zeros(p.shape)
            for n, p in engine.module.named_parameters()}


def train_once(engine, arr, batch):
    """Old log-probs, then one PPO mini-batch: the log-probs, metrics, gradients and new weights."""
    actor = PolicyActor(engine, arr)
    log_probs, _ = actor.compute_log_probs(batch, micro_size=2)
    grads, step = {}, engine.optimizer_step

    def record_then_step():
        grads.update(_full_grads(engine))
        return step()

    engine.optimizer_step = record_then_step
    metrics = actor.update_policy(batch.with_(old_log_probs=log_probs), mini_batch_rows=len(batch))
    weights = {k: v.clone() for k, v in engine.named_tensors()}
    return {"log_probs": log_probs * batch.response_mask, "metrics": metrics, "grads": grads, "weights": weights}


def _next_step(engine, batch):
    """A plain loss over trunk and MTP logits, one step: the weights after it."""
    loss = MicroBatchFn(lambda out, _: {"lse": out.logits.logsumexp(-1), "mtp": out.mtp_logits[1].mean(-1)},
                        lambda values, out, _: (values["lse"].mean() + values["mtp"].mean(), {}))
    engine.forward_backward([batch], loss)
    engine.optimizer_step()
    return {k: v.clone() for k, v in engine.named_tensors()}


def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    mine = _shard(_batch(), rank)
    results = {}
    for mode in MODES:
        arr = _arr(mode)
        results[f"fsdp2/{mode}"] = train_once(_engine("fsdp2", arr, gradient_checkpointing=True), arr, mine)
        results[f"ddp/{mode}"] = train_once(_engine("torch", arr), arr, mine)
    # token budget 12: rank 0's rows (8-11 tokens) make 3 micro-batches, rank 1's (5-6 tokens) 2
    arr = _arr("token-mean", "actor_rollout_ref.actor.use_dynamic_bsz=true",
               "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=12")
    results["uneven"] = train_once(_engine("fsdp2", arr), arr, mine)
    arr = _arr()
    results["hsdp"] = train_once(_engine("fsdp2", arr, fsdp={"fsdp_size": 1, "reshard_after_forward": False}), arr,
                                 mine)
    results["mtp_lr_scale"] = train_once(_engine("fsdp2", arr, mtp_lr_scale=4.0), arr, mine)
    # checkpoint: save after one update, then the next step from the live engine and from a fresh one
    engine = _engine("fsdp2", arr)
    train_once(engine, arr, mine)
    engine.save_checkpoint(os.path.join(out, "dcp"))
    engine.save_hf(os.path.join(out, "hf"))
    resumed = _engine("fsdp2", arr)
    resumed.load_checkpoint(os.path.join(out, "dcp"))
    # the trainer's way: the HF folder's full weights and this rank's state_dict() through a weights-only file
    torch.save({k: v for k, v in engine.state_dict().items() if k != "model"}, os.path.join(out, f"opt{rank}.pt"))
    from_files = _engine("fsdp2", arr)
    from_files.load_state_dict({"model": MTPCausalLM.from_pretrained(os.path.join(out, "hf")).state_dict(),
                                **torch.load(os.path.join(out, f"opt{rank}.pt"), weights_only=True)})
    results["resume"] = {"lr": (engine.lr, resumed.lr, from_files.lr),
                         "after": [_next_step(e, mine) for e in (engine, resumed, from_files)]}
    # fsdp_config.dtype=bf16 under the training core's rule: bf16 where this CPU runs it natively (else fp32
    # and a warning); parameters gathered in bf16, master weights and gradients stay fp32
    mixed = _engine("fsdp2", arr, mixed_precision=None if bf16_native(torch.device("cpu")) else True,
                    fsdp={"dtype": "bf16"})
    logits_dtype = mixed.infer([mine], MicroBatchFn(lambda out, _: {}, lambda v, out, _: out.logits.dtype))[0]
    results["bf16"] = {"logits_dtype": logits_dtype, **train_once(mixed, arr, mine)}
    try:
        _engine("fsdp2", arr, fsdp={"fsdp_size": 3})
    except ValueError as e:
        results["bad_fsdp_size"] = str(e)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from verl_mtp.net import free_port

    out = str(tmp_path_factory.mktemp("fsdp"))
    mp.start_processes(_rank_main, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    b = _batch()
    return {mode: train_once(_engine("torch", _arr(mode)), _arr(mode), b) for mode in MODES}


def _assert_same_training(ranks, ref):
    assert torch.allclose(torch.cat([r["log_probs"] for r in ranks]), ref["log_probs"], atol=1e-5)
    for key in ("actor/pg_loss", "mtp/loss"):  # each rank's share of the global mean
        assert sum(r["metrics"][key] for r in ranks) / WORLD == pytest.approx(ref["metrics"][key], rel=1e-5), key
    for key in ("actor/grad_norm", "actor/grad_norm_trunk", "actor/grad_norm_mtp"):
        for r in ranks:
            assert r["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5), key
    for r in ranks:
        assert r["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert torch.allclose(r["grads"][name], g, atol=1e-6, rtol=1e-4), name
        for name, w in ref["weights"].items():  # after one AdamW step
            assert torch.allclose(r["weights"][name], w, atol=1e-5), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_ranks_with_unequal_response_lengths_train_like_one_process(two_ranks, single_process, strategy, mode):
    _assert_same_training([r[f"{strategy}/{mode}"] for r in two_ranks[1]], single_process[mode])


def test_hybrid_sharding_mesh_trains_like_one_process(two_ranks, single_process):
    """fsdp_size=1 at world 2: a 2-D mesh (2 replicas x 1 shard), without resharding after forward."""
    _assert_same_training([r["hsdp"] for r in two_ranks[1]], single_process["token-mean"])


def test_mtp_lr_scale_steps_the_sharded_mtp_layers_like_one_process(two_ranks):
    """model.mtp.lr_scale reaches FSDP2's sharded parameters: the same step as one process's torch engine
    with the same scale (whose MTP layers move 4x as far: test_megatron_engine.py)."""
    arr = _arr()
    ref = train_once(_engine("torch", arr, mtp_lr_scale=4.0), arr, _batch())
    _assert_same_training([r["mtp_lr_scale"] for r in two_ranks[1]], ref)


def test_ranks_with_different_micro_batch_counts_train_like_one_process(two_ranks, single_process):
    """The rank with fewer micro-batches joins the other's extra all-gathers and reduce-scatters."""
    _assert_same_training([r["uneven"] for r in two_ranks[1]], single_process["token-mean"])


def test_each_rank_holds_half_of_the_parameters(two_ranks):
    for r in two_ranks[1]:
        m = r["fsdp2/token-mean"]["metrics"]
        assert m["actor/param_bytes_total"] == 4 * _model().num_parameters()
        assert m["actor/param_bytes_local"] == pytest.approx(m["actor/param_bytes_total"] / WORLD, rel=0.02)
    assert all("actor/param_bytes_local" not in r["ddp/token-mean"]["metrics"] for r in two_ranks[1])


def test_checkpoint_resumes_the_exact_next_step_and_exports_the_full_model(two_ranks):
    out, ranks = two_ranks
    for r in ranks:  # DCP folder, and HF folder + per-rank state_dict() file
        live, *resumed = r["resume"]["after"]
        assert len(set(r["resume"]["lr"])) == 1
        assert all(torch.equal(live[k], other[k]) for other in resumed for k in live)
    assert sorted(os.listdir(os.path.join(out, "dcp"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # the HF export holds the state after the first update (rank 0 wrote it, all ranks gathered)
    exported = MTPCausalLM.from_pretrained(os.path.join(out, "hf")).state_dict()
    first = ranks[0]["fsdp2/token-mean"]["weights"]  # the same model, batch and step
    assert all(torch.equal(exported[k], first[k]) for k in first)


def test_bf16_compute_keeps_fp32_master_weights_and_gradients(two_ranks, single_process):
    ref = single_process["token-mean"]
    for rank, r in enumerate(two_ranks[1]):
        bf16 = r["bf16"]
        assert bf16["logits_dtype"] == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in bf16["grads"].values())
        assert all(w.dtype == torch.float32 for w in bf16["weights"].values())
        rows = slice(rank * 3, rank * 3 + 3)
        assert torch.allclose(bf16["log_probs"], ref["log_probs"][rows], atol=0.05)
        assert not torch.equal(bf16["log_probs"], ref["log_probs"][rows])


def test_fsdp_size_that_does_not_divide_the_world_is_refused_in_one_line(two_ranks):
    assert two_ranks[1][0]["bad_fsdp_size"] == ("actor_rollout_ref.actor.fsdp_config.fsdp_size=3: must be -1 "
                                                "(all ranks) or divide the 2 ranks")


def test_fsdp_strategies_select_the_fsdp2_engine():
    from verl_mtp.engines.base import ENGINES

    assert ENGINES["fsdp"] == ENGINES["fsdp2"] == "verl_mtp.engines.fsdp_engine:FSDPEngine"


def test_gradient_checkpointing_recomputes_each_layer_in_backward_with_the_same_gradients():
    """model.enable_gradient_checkpointing (torch engine; fsdp2 runs it in the 2-rank scenarios): every
    decoder and MTP layer runs twice per micro-batch, and the gradients do not change."""
    arr, b = _arr(), _batch()
    grads, calls = [], []
    for on in (False, True):
        engine = _engine("torch", arr, gradient_checkpointing=on)
        count = [0]
        for layer in (*engine.module.model.layers, *engine.module.model.mtp_layers):
            layer.self_attn.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        actor = PolicyActor(engine, arr)
        step = engine.optimizer_step
        engine.optimizer_step = lambda: (grads.append(_full_grads(engine)), step())[1]
        actor.update_policy(b, mini_batch_rows=len(b))
        calls.append(count[0])
    assert calls == [3 * 4, 2 * 3 * 4]  # 3 micro-batches x (2 trunk + 2 MTP layers), recomputed once more
    assert all(torch.allclose(grads[1][n], g, atol=1e-7) for n, g in grads[0].items())


def test_log_probs_of_token_budget_micro_batches_come_back_in_row_order():
    """Packed by token budget, micro-batches hold rows out of order (longest first); the log-probs and
    entropies must still line up with the batch's rows."""
    arr, b = _arr(), _batch()
    actor = PolicyActor(_engine("torch", arr), arr)
    plain = actor.compute_log_probs(b, micro_size=len(b), entropy=True)
    packed = actor.compute_log_probs(b, entropy=True, dynamic=True, max_tokens=12)
    for x, y in zip(plain, packed):
        assert torch.allclose(x * b.response_mask, y * b.response_mask, atol=1e-6)


def test_fsdp_size_that_does_not_divide_the_devices_fails_at_config_check():
    from verl_mtp.config import ConfigError

    with pytest.raises(ConfigError, match=r"^key 'actor_rollout_ref\.actor\.fsdp_config\.fsdp_size': 3 must be -1"):
        load_config(["actor_rollout_ref.actor.strategy=fsdp2", "trainer.n_gpus_per_node=2",
                     "actor_rollout_ref.actor.fsdp_config.fsdp_size=3"])
