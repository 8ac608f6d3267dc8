"""trunk_fingerprint on a real model's shapes: SmolLM2-135M's tied 49152 x 576 embedding (28.3 M values)
made the float32 linspace of sample positions round its last index past the end (IndexError)."""

import torch

from verl_mtp.trainer.mtp_warmup_data import trunk_fingerprint


class _Trunk:
    def __init__(self, tensors):
        self.tensors = tensors

    def state_dict(self):
        return self.tensors


def test_fingerprint_of_a_49k_vocab_embedding_samples_its_last_value():
    emb = torch.zeros(49152, 576)
    base = trunk_fingerprint(_Trunk({"model.embed_tokens.weight": emb}))
    emb[-1, -1] = 1.0  # the last value is one of the 1024 sampled positions
    assert trunk_fingerprint(_Trunk({"model.embed_tokens.weight": emb})) != base
    emb[-1, -1] = 0.0
    assert trunk_fingerprint(_Trunk({"model.embed_tokens.weight": emb,
                                     "model.mtp_layers.0.w": torch.ones(3)})) == base  # MTP layers are not trunk
