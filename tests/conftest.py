"""Shared fixtures: tiny models trained in seconds on a toy Markov chain (see verl_mtp.models.toy)."""

import pytest
import torch

from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.models.toy import fit_markov, swap_peaks


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' tensors are tiny: more OpenMP threads only add contention, and two threads on two
    shared cores collapse. One thread for the whole session (Ray workers and servers set their own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sglang_on_gpu() -> bool:
    try:
        import sglang  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# GPU tests that drive a real SGLang server: `@needs_sglang` (with `@pytest.mark.gpu`)
needs_sglang = pytest.mark.skipif(not _sglang_on_gpu(), reason="needs CUDA and sglang")


def toy_config(**kw) -> ModelConfig:
    base = dict(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_nextn_predict_layers=2, max_position_embeddings=128)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def good_draft_model():
    """Trunk and MTP layers trained on the same chain: drafts are mostly accepted."""
    torch.manual_seed(0)
    model, _ = fit_markov(MTPCausalLM(toy_config()), steps=150, seq_len=24)
    return model


@pytest.fixture(scope="session")
def bad_draft_model():
    """MTP layers trained on the chain with swapped peaks: confident, often rejected drafts. This is the
    regime where a wrong rejection rule shows in the output distribution."""
    torch.manual_seed(0)
    model, transitions = fit_markov(MTPCausalLM(toy_config()), steps=120, seq_len=24)
    model, _ = fit_markov(model, steps=80, seq_len=24, transitions=swap_peaks(transitions), mtp_only=True)
    return model
