"""The log-prob passes are sized as in verl: old log-probs by rollout.log_prob_*, the reference's by ref.log_prob_*."""

import pytest
import torch

from verl_mtp.algos.batching import partition_by_token_budget
from verl_mtp.batch import from_samples
from verl_mtp.config import load_config, to_dict
from verl_mtp.data.synthetic_math import iter_corpus_text
from verl_mtp.data.tokenizer import train_tokenizer
from verl_mtp.workers.policy_worker import PolicyWorker

ARR = "actor_rollout_ref."
SIZING = [ARR + "rollout.log_prob_micro_batch_size_per_gpu=4", ARR + "ref.log_prob_micro_batch_size_per_gpu=2",
          "trainer.device=cpu"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(iter_corpus_text(300, seed=0), str(tmp_path_factory.mktemp("tok")))


def record_micro_batches(worker) -> list[list[int]]:
    """Rows of each micro-batch the worker's engine is handed per pass (the real split, recorded)."""
    seen, infer = [], worker.actor.engine.infer

    def record(micros, fn):
        seen.append([len(m) for m in micros])
        return infer(micros, fn)

    worker.actor.engine.infer = record
    return seen


def batch(rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 9, (rows,), generator=g)]
    responses = [torch.randint(3, 40, (n,), generator=g).tolist() for n in lengths]
    return from_samples([[5, 6, 7]] * rows, responses, [[0.0] * n for n in lengths], pad_id=0, meta={})


@pytest.mark.parametrize("role, rows", [("ref", [2, 2, 2, 2]), ("actor", [4, 4])])
def test_each_pass_takes_its_own_sections_micro_batch_size(tokenizer_dir, role, rows):
    worker = PolicyWorker(to_dict(load_config(SIZING)), role, tokenizer_dir=tokenizer_dir)
    micro_batch_rows = record_micro_batches(worker)
    log_probs = worker.compute_log_probs(batch())
    assert micro_batch_rows == [rows] and log_probs.shape == batch().responses.shape


def test_the_refs_dynamic_batching_and_token_budget_are_its_own(tokenizer_dir):
    dynamic = [ARR + "ref.log_prob_use_dynamic_bsz=true", ARR + "ref.log_prob_max_token_len_per_gpu=12"]
    worker = PolicyWorker(to_dict(load_config(SIZING + dynamic)), "ref", tokenizer_dir=tokenizer_dir)
    micro_batch_rows, b = record_micro_batches(worker), batch()
    worker.compute_log_probs(b)
    packed = sorted(len(group) for group in partition_by_token_budget(b.seq_lengths(), 12))
    assert [sorted(rows) for rows in micro_batch_rows] == [packed] and packed != [2, 2, 2, 2]  # the ref's budget
