"""Shared by the rollout server tests: the tiny good/bad-draft models and their saved folder."""

import copy

import pytest
import torch

from tests.conftest import toy_config
from verl_mtp.models import MTPCausalLM
from verl_mtp.models.toy import fit_markov, swap_peaks
from verl_mtp.rollout import NativeEngine

DEPTH = 2


def tiny_models():
    """(good, bad): trunk and K=2 MTP layers fit to a toy chain in about a second; `bad` has MTP layers
    refit to the chain with swapped peaks, so its greedy drafts are almost always rejected."""
    torch.manual_seed(0)
    good, transitions = fit_markov(MTPCausalLM(toy_config()), steps=40, batch_size=16, seq_len=16, lr=1e-2)
    bad, _ = fit_markov(copy.deepcopy(good), steps=30, batch_size=16, seq_len=16, lr=1e-2,
                        transitions=swap_peaks(transitions), mtp_only=True)
    return good, bad


def engine_for(model, depth=DEPTH):
    return NativeEngine(copy.deepcopy(model), max_batch_size=64, max_seq_len=128, speculative=depth)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    """The good model saved as a MiMo folder (what a server process loads)."""
    path = tmp_path_factory.mktemp("toy_model")
    models[0].save_pretrained(path)
    return str(path)
