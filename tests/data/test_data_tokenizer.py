import json

import pytest

from verl_mtp.data.synthetic_math import chat_prompt, generate_problems, iter_corpus_text
from verl_mtp.data.tokenizer import SPECIAL_TOKENS, encode_chat, encode_response, train_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(iter_corpus_text(2000, seed=0), str(tmp_path_factory.mktemp("tok")), vocab_size=512)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_special_tokens_have_fixed_ids_and_roles(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 3
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == 2


def test_round_trip_on_task_text_and_unseen_text(tokenizer):
    texts = [p["solution"] for p in generate_problems(20, seed=9)] + ["héllo wörld ∑ 3.14\n\ttabs"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer.encode("x 90817 = 2", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == ["9", "0", "8", "1", "7", "2"]


def test_chat_template_renders_chatml(tok_dir, tokenizer):
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert plain == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
    with open(f"{tok_dir}/tokenizer_config.json") as f:
        assert "add_generation_prompt" in json.load(f)["chat_template"]


def test_encode_chat_matches_apply_chat_template(tokenizer):
    messages = [{"role": "user", "content": "Tom has 3 pens. How many pens does Tom have now?"}]
    tokenized = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5.x returns a BatchEncoding here, 4.x a list.
    expected = tokenized if isinstance(tokenized, list) else tokenized["input_ids"]
    assert encode_chat(tokenizer, messages) == expected
    assert encode_chat(tokenizer, messages)[-2:] == tokenizer.encode("assistant\n", add_special_tokens=False)


def test_task_fits_the_quickstart_length_budget(tokenizer):
    for p in generate_problems(300, seed=4):
        assert len(encode_chat(tokenizer, chat_prompt(p["question"]))) <= 48
        response = encode_response(tokenizer, p["solution"])
        assert len(response) <= 48 and response[-1] == tokenizer.eos_token_id


def test_isolated_spaces_are_tokens_of_their_own(tmp_path):
    """The quickstart's shift scenario: every space costs one token, so a length penalty sees each one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(train_tokenizer(iter_corpus_text(500, seed=0), str(tmp_path),
                                                        isolate_spaces=True))
    for text, spaces in (("17 + 5 = 22", 4), ("17+5=22", 0), ("17  +5 =22", 3)):
        pieces = tok.convert_ids_to_tokens(tok.encode(text))
        assert pieces.count("Ġ") == spaces and len(pieces) == 7 + spaces and tok.decode(tok.encode(text)) == text
