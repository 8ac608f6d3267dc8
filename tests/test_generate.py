"""`verl-mtp generate`: streamed output equals the engine's, prompts files go through the engine as one
batch, the chat loop keeps and clears history, the engine's penalties (decoded plainly, checked against
a step-by-step loop), incremental detokenization, the accept-length line and one-line errors."""

import io
import json
import re
from dataclasses import replace

import pytest
import torch

from verl_mtp import generate as gen_cli
from verl_mtp.algos.mtp_loss import compute_mtp_loss
from verl_mtp.data.synthetic_math import iter_corpus_text
from verl_mtp.data.tokenizer import encode_chat, train_tokenizer
from verl_mtp.generate import Generator, SamplingParams, encode_prompt
from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.rollout import NativeEngine
from verl_mtp.rollout.sampling import apply_penalties, banned_ngram_tokens

QUESTIONS = ["What is 2 + 3?", "Tom has 5 apples. He buys 3. How many apples does Tom have now?", "What is 17 - 9?"]


def train_text_model(tokenizer, steps=100, mtp_layers=2) -> MTPCausalLM:
    """A tiny model fitted for a few seconds to synthetic math text: it writes task-like, repetitive text
    and its MTP layers draft well enough that speculation really accepts tokens."""
    texts = iter_corpus_text(300, seed=1)
    stream = torch.tensor([i for t in texts for i in tokenizer.encode(t) + [tokenizer.eos_token_id]])
    torch.manual_seed(0)
    model = MTPCausalLM(ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    num_nextn_predict_layers=mtp_layers, tie_word_embeddings=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 41, (16,), generator=g)
        x = torch.stack([stream[s:s + 40] for s in starts])
        out = model(x)
        lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        mtp, _ = compute_mtp_loss(out.mtp_logits, x, torch.ones_like(x))
        opt.zero_grad()
        (lm + mtp).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    train_tokenizer(iter_corpus_text(2000, seed=0), str(folder))
    from verl_mtp.trainer.setup import load_tokenizer

    train_text_model(load_tokenizer(str(folder))).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return gen_cli.load(model_dir, None, "cpu")


def greedy(tokenizer, max_new_tokens=40, **kw):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id], **kw)


def engine_text(model, tokenizer, prompts, max_new_tokens=40, speculative=0):
    engine = NativeEngine(model, tokenizer, max_batch_size=4, max_seq_len=256)
    out = engine.generate(prompts, greedy(tokenizer, max_new_tokens), speculative=speculative)
    return [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in out.samples], out


def run_main(argv, capsys, stdin=None):
    code = gen_cli.main(argv, stdin=stdin or io.StringIO(""))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- single prompt, streaming ------------------------------------------------------------------


@pytest.mark.parametrize("speculative", ["auto", "0", "2"])
def test_single_prompt_greedy_output_equals_the_engine(model_dir, loaded, capsys, speculative):
    model, tokenizer = loaded
    [expected], _ = engine_text(model, tokenizer, [encode_chat(tokenizer, [{"role": "user", "content": QUESTIONS[1]}])])
    code, out, err = run_main([model_dir, "--prompt", QUESTIONS[1], "--max-new-tokens", "40",
                               "--speculative", speculative, "--threads", "1"], capsys)
    assert code == 0 and expected.strip()
    assert out == expected + "\n"


def test_stream_writes_pieces_as_they_come_and_counts_accepted_drafts(loaded):
    model, tokenizer = loaded
    generator = Generator(model, tokenizer, greedy(tokenizer, 40), speculative=2, max_seq_len=256)
    pieces = []
    prompt = encode_prompt(tokenizer, QUESTIONS[0])
    completion = generator.stream(prompt, pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == completion.text
    assert generator.stats.accept_length > 1.2  # drafts were accepted while streaming
    [expected], _ = engine_text(model, tokenizer, [prompt])
    assert completion.text == expected


def test_seeded_sampling_is_reproducible_at_a_fixed_depth(model_dir, capsys):
    # (with `auto` the depth follows measured timings, and the depth decides which random numbers are drawn)
    argv = [model_dir, "--prompt", QUESTIONS[0], "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9",
            "--speculative", "2", "--seed", "7", "--max-new-tokens", "30"]
    first, second = run_main(argv, capsys)[1], run_main(argv, capsys)[1]
    assert first == second
    other = run_main(argv[:-3] + ["8", "--max-new-tokens", "30"], capsys)[1]
    assert other != first


def test_accept_length_is_printed_at_the_end(model_dir, capsys):
    _, _, err = run_main([model_dir, "--prompt", QUESTIONS[0], "--max-new-tokens", "30"], capsys)
    assert re.search(r"accept length \d+\.\d\d \(speculative depth auto\); \d+ tokens", err.splitlines()[-1])
    _, _, err = run_main([model_dir, "--prompt", QUESTIONS[0], "--max-new-tokens", "30", "--speculative", "3"], capsys)
    assert "(speculative depth 3)" in err
    _, _, err = run_main([model_dir, "--prompt", QUESTIONS[0], "--max-new-tokens", "30", "--speculative", "0"], capsys)
    assert "speculative decoding off (--speculative 0)" in err


# ---- prompts file ------------------------------------------------------------------------------


def test_prompts_file_is_one_engine_batch_in_order(model_dir, loaded, capsys, tmp_path, monkeypatch):
    model, tokenizer = loaded
    expected, _ = engine_text(model, tokenizer, [encode_prompt(tokenizer, q) for q in QUESTIONS])
    calls = []
    original = NativeEngine.generate

    def spy(self, prompts, *args, **kw):
        calls.append(len(prompts))
        return original(self, prompts, *args, **kw)

    monkeypatch.setattr(NativeEngine, "generate", spy)
    text_file = tmp_path / "q.txt"
    text_file.write_text("\n".join(QUESTIONS) + "\n\n")
    jsonl_file = tmp_path / "q.jsonl"
    jsonl_file.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"prompt": QUESTIONS[1]}) + "\n"
                          + json.dumps({"prompt": [{"role": "user", "content": QUESTIONS[2]}]}) + "\n")
    for path in (text_file, jsonl_file):
        calls.clear()
        code, out, _ = run_main([model_dir, "--prompts-file", str(path), "--max-new-tokens", "40", "--batch-size", "2"],
                                capsys)
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and calls == [3]  # one call; the engine batches 2 at a time by itself
        assert [r["response"] for r in rows] == expected
        assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert rows[2]["prompt"] == [{"role": "user", "content": QUESTIONS[2]}]


def test_prompts_from_stdin(model_dir, capsys):
    code, out, _ = run_main([model_dir, "--prompts-file", "-", "--max-new-tokens", "5"], capsys,
                            stdin=io.StringIO("What is 1 + 1?\nWhat is 2 + 2?\n"))
    assert code == 0 and len(out.splitlines()) == 2


def test_bad_jsonl_prompt_is_one_line(model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('"ok"\n{"prompt": 3}\n')
    with pytest.raises(SystemExit) as info:
        gen_cli.main([model_dir, "--prompts-file", str(path)])
    assert str(info.value).startswith(f"verl-mtp generate: error: {path} line 2: field 'prompt' must be")


# ---- chat ------------------------------------------------------------------------------------


def test_chat_keeps_history_clears_it_and_exits(loaded, monkeypatch):
    model, tokenizer = loaded
    generator = Generator(model, tokenizer, greedy(tokenizer, 12), max_seq_len=512)
    seen = []
    original = generator.stream

    def spy(ids, write):
        seen.append(tokenizer.decode(ids))
        return original(ids, write)

    monkeypatch.setattr(generator, "stream", spy)
    lines = iter(["What is 1 + 1?", "", "And 2 + 2?", "clear", "What is 3 + 3?", "exit", "never read"])
    out = io.StringIO()
    gen_cli.chat_loop(generator, read=lambda prompt: next(lines), out=out)
    assert next(lines) == "never read"  # `exit` stopped the loop
    assert len(seen) == 3  # the empty line was not sent
    assert "What is 1 + 1?" in seen[1] and "<|im_start|>assistant" in seen[1] and "And 2 + 2?" in seen[1]
    assert "1 + 1" not in seen[2] and "What is 3 + 3?" in seen[2]  # `clear` dropped the history
    assert "(history cleared)" in out.getvalue()


def test_chat_through_main_reads_stdin_and_stops_at_end_of_input(model_dir, capsys):
    code, out, err = run_main([model_dir, "--chat", "--max-new-tokens", "8", "--max-seq-len", "256"], capsys,
                              stdin=io.StringIO("What is 1 + 1?\nclear\nWhat is 2 + 2?\n"))
    assert code == 0
    assert out.count("assistant> ") == 2 and "(history cleared)" in out
    assert "accept length" in err


def test_chat_drops_the_oldest_turns_when_the_history_no_longer_fits(loaded):
    model, tokenizer = loaded
    history = [{"role": "user", "content": QUESTIONS[1]}, {"role": "assistant", "content": "17 + 5 = 22"},
               {"role": "user", "content": QUESTIONS[0]}]
    full, last = len(encode_chat(tokenizer, history)), len(encode_chat(tokenizer, history[2:]))
    generator = Generator(model, tokenizer, greedy(tokenizer, 8), max_seq_len=full + 7)  # one token short
    prompt = gen_cli._fit_history(generator, history, None)
    assert history == [{"role": "user", "content": QUESTIONS[0]}] and len(prompt) == last
    generator.max_seq_len = last + 7
    assert gen_cli._fit_history(generator, history, None) is None


def test_no_prompt_without_a_terminal_is_an_error(model_dir):
    with pytest.raises(SystemExit, match=r"^verl-mtp generate: error: no prompt: give --prompt"):
        gen_cli.main([model_dir], stdin=io.StringIO("hi\n"))


# ---- penalties (SamplingParams options of the engine) -----------------------------------------


def test_penalties_match_hand_computed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_penalties(logits, [[0, 1, 1]], SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]]  # input untouched
    out = apply_penalties(logits, [[0, 1, 1]], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [[2.0 - 0.75, -1.0 - 1.0, 0.5, 3.0]]


def test_banned_ngram_tokens():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_ngram_tokens([1, 2, 3, 1, 2, 4, 1, 2], 3) == {3, 4}
    assert banned_ngram_tokens([5, 6], 3) == set()
    assert banned_ngram_tokens([5, 6, 5], 1) == {5, 6}
    out = apply_penalties(torch.zeros(2, 8), [[1, 2, 1], []], SamplingParams(no_repeat_ngram_size=2))
    assert torch.isinf(out[0, 2]) and torch.isfinite(out[0]).sum() == 7 and torch.isfinite(out[1]).all()


def test_penalised_engine_equals_a_plain_loop_over_the_model(loaded):
    """The engine's penalised decoding (ragged batch, continuous batching) against step-by-step greedy
    decoding of the full model with the penalty applied by hand."""
    model, tokenizer = loaded
    prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
    params = replace(greedy(tokenizer, 24), repetition_penalty=1.3, frequency_penalty=0.2)
    engine = NativeEngine(model, tokenizer, max_batch_size=2, max_seq_len=256)
    out = engine.generate(prompts, params, speculative=2)
    assert set(out.depth_histogram) == {0}  # penalties: plain decoding
    plain = engine.generate(prompts, greedy(tokenizer, 24), speculative=2)
    assert [s.token_ids for s in plain.samples] != [s.token_ids for s in out.samples]  # the penalties bite
    for prompt, sample in zip(prompts, out.samples):
        tokens = []
        with torch.no_grad():
            for _ in sample.token_ids:
                logits = model(torch.tensor([prompt + tokens])).logits[:, -1]
                tokens.append(int(apply_penalties(logits, [tokens], params).argmax(-1)))
                if tokens[-1] in params.stop_token_ids:
                    break
        assert tokens == sample.token_ids


def repeated_ngrams(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_repetition_penalty_changes_the_output(model_dir, capsys):
    argv = [model_dir, "--prompt", QUESTIONS[1], "--max-new-tokens", "40"]
    _, plain, _ = run_main(argv, capsys)
    _, penalised, err = run_main(argv + ["--repetition-penalty", "1.5"], capsys)
    assert penalised != plain
    assert "speculative decoding is off" in err and "speculative decoding off (penalties active" in err


def test_no_repeat_ngram_forbids_repeats(loaded):
    model, tokenizer = loaded
    prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
    plain = Generator(model, tokenizer, greedy(tokenizer, 60), max_batch_size=3, max_seq_len=256).generate(prompts)
    assert any(repeated_ngrams(c.token_ids, 3) for c in plain)  # the model does repeat itself
    for n in (2, 3):
        generator = Generator(model, tokenizer, replace(greedy(tokenizer, 60), no_repeat_ngram_size=n),
                              max_batch_size=3, max_seq_len=256)
        assert generator.depth == 0
        for completion in generator.generate(prompts):
            assert repeated_ngrams(completion.token_ids, n) == 0
    sampled = Generator(model, tokenizer, SamplingParams(temperature=1.0, max_new_tokens=60, seed=0,
                                                         no_repeat_ngram_size=2), max_seq_len=256)
    assert repeated_ngrams(sampled.stream(prompts[0], lambda _: None).token_ids, 2) == 0


# ---- detokenization, errors --------------------------------------------------------------------


def test_text_stream_never_writes_half_characters(loaded):
    _, tokenizer = loaded
    text = "héllo wörld ∑ 3.14"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = []
    stream = gen_cli.TextStream(tokenizer, pieces.append)
    for i in ids:
        stream.push([i])
    assert stream.finish() == text
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("argv, message", [
    (["--speculative", "two"], "argument --speculative: must be 'auto' or a draft depth >= 0, got 'two'"),
    (["--speculative", "9"], "--speculative 9 exceeds the engine's max draft depth 6"),
    (["--top-p", "0"], "--top-p must be in (0, 1] (got 0.0)"),
    (["--max-seq-len", "20"], "prompt is"),
    (["--raw", "--chat"], "--raw has no chat"),
])
def test_option_errors_are_one_line(model_dir, argv, message):
    extra = [] if "--chat" in argv else ["--prompt", QUESTIONS[0]]
    with pytest.raises(SystemExit) as info:
        gen_cli.main([model_dir, *extra, *argv])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_speculation_needs_mtp_layers(tmp_path, loaded):
    model, tokenizer = loaded
    folder = tmp_path / "plain"
    plain = MTPCausalLM(ModelConfig(**{**model.config.__dict__, "num_nextn_predict_layers": 0, "extra": {}}))
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    with pytest.raises(SystemExit, match="--speculative 2 needs MTP layers; the model has none"):
        gen_cli.main([str(folder), "--prompt", "hi", "--speculative", "2"])
