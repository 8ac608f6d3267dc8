"""Context parallel: the zigzag split and merge (pure functions), the policy loss computed from split
pieces, and the megatron engine at CP=2 over gloo on CPU (local spec, `AllGatherCPAttention`) against
the torch engine; this file is also that run's worker script. On GPU: the TE spec's CP attention."""

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from verl_mtp.engines import context_parallel as cp
from verl_mtp.engines.actor import PolicyActor
from verl_mtp.engines.base import build_engine
from verl_mtp.models import MTPCausalLM
from tests.conftest import toy_config

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [1, 5, 8, 13, 24])
def test_split_and_merge_round_trip(size, length):
    padded = cp.padded_length(length, size)
    assert padded >= length and padded % (2 * size if size > 1 else 1) == 0 and padded - length < 2 * size
    x = cp.pad_to(torch.randn(3, length, 4), padded)
    pieces = [cp.split(x, size, r) for r in range(size)]
    assert all(p.shape == (3, padded // size, 4) for p in pieces)
    assert torch.equal(cp.merge(pieces), x)
    held = torch.cat([cp.positions(padded, size, r) for r in range(size)])
    assert sorted(held.tolist()) == list(range(padded))  # every position on exactly one rank
    for r in range(size):
        assert torch.equal(pieces[r], x[:, cp.positions(padded, size, r)])  # position ids match the tokens


def test_rank_r_holds_chunks_r_and_its_mirror_so_causal_work_is_balanced():
    assert cp.positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp.positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp.positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    # a query at position t attends to t + 1 keys: every rank gets the same number of scores
    work = [int((cp.positions(48, 4, r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1


def test_padding_keeps_sequence_parallel_chunks_whole():
    assert cp.padded_length(13, 1) == 13 and cp.padded_length(13, 1, multiple=2) == 14
    assert cp.padded_length(13, 2, multiple=2) == 16  # 4 chunks of 4: each rank's 8 split over 2 TP ranks


def test_causal_mask_is_the_whole_mask_at_the_ranks_positions():
    whole = torch.ones(16, 16, dtype=torch.bool).triu(1)
    for r in range(4):
        assert torch.equal(cp.causal_mask(16, 4, r)[0, 0], whole[cp.positions(16, 4, r)])


def _batch_and_model():
    from tests.engines.test_megatron_engine import _arr, _batch

    torch.manual_seed(0)
    model = MTPCausalLM(toy_config())
    return _batch(), model, _arr()


@pytest.mark.parametrize("size", [2, 3])
def test_policy_loss_from_split_pieces_equals_the_unsplit_loss(size):
    """The engine's CP data path without the model: each rank's per-token stage on its pieces of the
    logits, values merged in sequence order, then the loss: equal to the unsplit loss, and so are the
    gradients reaching the logits."""
    from verl_mtp.engines.megatron_engine import restore_layout

    b, model, arr = _batch_and_model()
    actor = PolicyActor(build_engine("torch", model=copy.deepcopy(model), num_mtp=2), arr)
    actor.policy_targets = False  # as on a CP engine: no per-token value reads another position's logits
    b = b.with_(old_log_probs=actor.compute_log_probs(b)[0])
    fn = actor._loss_fn(float(b.response_mask.sum()), float(len(b)))
    out = model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, num_mtp=2)
    leaves = [out.logits.detach().requires_grad_(), *(x.detach().requires_grad_() for x in out.mtp_logits)]
    whole = out.__class__(logits=leaves[0], mtp_logits=leaves[1:], hidden_states=out.hidden_states)
    ref_loss, ref_metrics = fn(whole, b)
    ref_grads = torch.autograd.grad(ref_loss, leaves)

    shift = (b.attention_mask.cumsum(-1) == 0).sum(-1)  # the engine's left-alignment of each row, then the split
    padded = cp.padded_length(b.input_ids.shape[1], size)
    local = lambda x, r: cp.split(cp.pad_to(restore_layout(x, -shift), padded), size, r)  # noqa: E731
    pieces = []
    for r in range(size):
        part = whole.__class__(logits=local(whole.logits, r), mtp_logits=[local(x, r) for x in whole.mtp_logits],
                               hidden_states=whole.hidden_states)
        pieces.append(fn.per_token(part, {k: local(v, r) for k, v in fn.targets(b).items()}))
    values = {k: restore_layout(cp.merge([p[k] for p in pieces])[:, : b.input_ids.shape[1]], shift)
              for k in pieces[0]}
    loss, metrics = fn.reduce(values, whole, b)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    assert metrics == pytest.approx(ref_metrics, rel=1e-6)
    for ours, ref in zip(torch.autograd.grad(loss, leaves), ref_grads):
        assert torch.allclose(ours, ref, atol=1e-7)


# ---------------------------------------------------------------- CP=2 over gloo, in subprocesses


def _worker(rank: int, world: int, port: int, out_dir: str, megatron: str) -> None:
    """One rank of a megatron run with the given `megatron` keys: whole outputs and one PPO update."""
    from tests.engines.test_megatron_engine import _arr, _batch, _engine, _model, train_once, whole_output
    from verl_mtp.engines import megatron_runtime as rt

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    arr = _arr()
    engine = _engine("megatron", _model(), arr, megatron=json.loads(megatron))
    values, local = whole_output(engine, _batch())
    result = train_once(engine, arr, _batch())
    attention = {type(m).__name__ for m in engine.gpt.modules() if isinstance(m, rt.cp_attention_class())}
    result.update(values=values, local_positions=local.logits.shape[1], cp_attention=sorted(attention))
    if rank == 0:
        torch.save(result, os.path.join(out_dir, "result.pt"))
    torch.distributed.destroy_process_group()


def run_ranks(world: int, megatron: dict) -> dict:
    from verl_mtp.net import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), out, json.dumps(megatron)],
                                  env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for r in range(world)]
        logs = [p.communicate(timeout=300)[0].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
        return torch.load(os.path.join(out, "result.pt"), weights_only=False)


@pytest.mark.parametrize("world,megatron", [(2, {"context_parallel_size": 2}),
                                           (4, {"context_parallel_size": 2, "tensor_model_parallel_size": 2})])
def test_context_parallel_2_on_cpu_matches_the_torch_engine(world, megatron):
    """Real CP: each rank runs half of every (padded) sequence through megatron's GPTModel, attention
    gathers keys/values over the CP group, the MTP layers roll tokens across the ranks' chunk
    boundaries, per-token values are gathered, and DDP sums gradients over the CP ranks."""
    pytest.importorskip("megatron.core")
    from tests.engines.test_megatron_engine import _arr, _assert_same_training, _batch, _engine, _model, train_once

    ours = run_ranks(world, megatron)
    b = _batch()
    assert ours["cp_attention"] == ["AllGatherCPAttention"]
    assert ours["local_positions"] == cp.padded_length(b.input_ids.shape[1], 2) // 2
    model, arr = _model(), _arr()
    with torch.no_grad():
        ref = model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, num_mtp=2)
    real = b.attention_mask.bool()
    assert torch.allclose(ours["values"]["logits"][real], ref.logits[real], atol=1e-4)
    for i, theirs in enumerate(ref.mtp_logits):
        valid = real[:, :-(i + 1)] & real[:, i + 1:]
        assert torch.allclose(ours["values"][f"mtp_{i}"][:, :-(i + 1)][valid], theirs[:, :-(i + 1)][valid], atol=1e-4)
    _assert_same_training(ours, train_once(_engine("torch", model, arr), arr, b))


def test_context_parallel_with_moe_is_refused_in_one_line():
    pytest.importorskip("megatron.core")
    moe = MTPCausalLM(toy_config(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    with pytest.raises(NotImplementedError, match="context_parallel_size=2 with an MoE model") as err:
        build_engine("megatron", model=moe, optim=None, megatron={"context_parallel_size": 2})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_context_parallel_2_gives_the_cp_1_loss_and_gradients():
    """2 GPUs under torchrun: `torchrun --nproc-per-node 2 -m pytest -m gpu tests/engines/test_megatron_context_parallel.py`.
    CP=2 with the TE spec (TransformerEngine's CP attention) against the torch engine on the same batch."""
    from tests.engines.test_megatron_engine import assert_megatron_trains_like_torch_on_gpus

    assert_megatron_trains_like_torch_on_gpus({"context_parallel_size": 2})


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
