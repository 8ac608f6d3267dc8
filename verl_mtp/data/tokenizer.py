"""A small byte-level BPE tokenizer for the from-scratch quickstart model, and chat helpers.

Conventions (ids are fixed because the special tokens are registered first):

    0 <|pad|>        padding only, never trained on
    1 <|endoftext|>  separates documents in a pretraining stream
    2 <|im_start|>   starts a chat turn
    3 <|im_end|>     ends a chat turn; the EOS that stops generation

Digits are always single tokens, so `17 + 5 = 22` is learnable digit by digit. There is
no BOS: every chat prompt already starts with `<|im_start|>`, like Qwen2 chat models.

Train from the command line:

    python -m verl_mtp.data.tokenizer OUT_DIR [--vocab-size 512] [--n-problems 20000]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence

PAD_TOKEN = "<|pad|>"
EOT_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOT_TOKEN, IM_START, IM_END)
EOS_TOKEN = IM_END

# ChatML. Rendered: <|im_start|>user\n{content}<|im_end|>\n ... and, with
# add_generation_prompt, a trailing <|im_start|>assistant\n for the model to continue.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512,
                    min_frequency: int = 2, model_max_length: int = 4096, isolate_spaces: bool = False) -> str:
    """Train byte-level BPE on `texts` and save an HF tokenizer folder; returns `out_dir`.

    The vocabulary may come out smaller than `vocab_size` when the corpus runs out of
    merges (the synthetic task has only a few dozen words). `isolate_spaces`: every space is a token of
    its own, never merged into a word or symbol (the quickstart's shift scenario, where each space of a
    trace is a choice the policy makes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # Digits first: byte-level BPE alone would merge "17" into one opaque token.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        *([pre_tokenizers.Split(" ", "isolated")] if isolate_spaces else []),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    _write_config(out_dir, model_max_length)
    return out_dir


def _write_config(out_dir: str, model_max_length: int) -> None:
    # Written by hand rather than via save_pretrained: transformers versions disagree on
    # where the chat template goes, and serving engines read it from this file.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "additional_special_tokens": [EOT_TOKEN, IM_START],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template.

    `apply_chat_template(tokenize=True)` returns a list in transformers 4.x but a
    BatchEncoding in 5.x; rendering to text and encoding without extra special tokens
    is what both do internally, so this gives the same ids on either version.
    """
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_response(tokenizer, response: str) -> list[int]:
    """Ids of an assistant reply as the model must generate it: the text, then EOS."""
    return tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]


def main(argv: Sequence[str] | None = None) -> None:
    from verl_mtp.data.synthetic_math import iter_corpus_text

    parser = argparse.ArgumentParser(description="Train the quickstart tokenizer on synthetic math text.")
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--n-problems", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_tokenizer(iter_corpus_text(args.n_problems, args.seed), args.out_dir, args.vocab_size)
    print(f"tokenizer: {args.out_dir}")



# the files that make up an HF tokenizer folder (whichever of them exist)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def copy_tokenizer_files(source, out) -> None:
    """Copy a tokenizer folder's files into `out` (a model folder), byte for byte; no-op onto itself."""
    import shutil
    from pathlib import Path

    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


if __name__ == "__main__":
    main()
