"""DPO stage: the loss against hand-computed numbers, data loading and one-line row errors, the
reference scored once, gradient accumulation, MTP loss placement, learning a toy preference, and
the command line end to end (checkpoint with tokenizer)."""

import copy
import json
import math

import pytest
import torch

from verl_mtp.data.synthetic_math import generate_problems, iter_corpus_text
from verl_mtp.data.tokenizer import train_tokenizer
from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.trainer import dpo
from verl_mtp.trainer.dpo import DPOConfig, DPOError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(iter_corpus_text(2000, seed=0), str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from verl_mtp.trainer.setup import load_tokenizer

    return load_tokenizer(tok_dir)


def tiny_model(tokenizer, mtp_layers=2, seed=0) -> MTPCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_nextn_predict_layers=mtp_layers,
                      tie_word_embeddings=True)
    return MTPCausalLM(cfg)


def toy_rows(n, seed=0):
    """Math questions; the preferred reply is always one fixed pattern, the dispreferred another."""
    questions = [p["question"] for p in generate_problems(n, seed=seed)]
    return [{"prompt": q, "chosen": "Answer: 7", "rejected": "Answer: 3"} for q in questions]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def config(**kw) -> DPOConfig:
    base = dict(out=None, beta=0.1, lr=3e-3, batch_size=4, epochs=1, warmup_ratio=0.0, schedule="constant",
                mtp_scale=0.0, log_every=1)
    base.update(kw)
    return DPOConfig(**base)


def test_dpo_loss_matches_hand_computed_values():
    loss, chosen, rejected = dpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                          torch.tensor([-1.5]), beta=0.5)
    # rewards 0.5 * 0.5 = 0.25 and 0.5 * -0.5 = -0.25; loss = log(1 + e^-0.5)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))


def test_load_pairs_from_jsonl_and_parquet_agree(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = toy_rows(3)
    as_messages = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    as_messages[1]["prompt"].insert(0, {"role": "system", "content": "Be brief."})
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [rows[0], as_messages[1], rows[2]])  # strings and messages mixed
    pq.write_table(pa.Table.from_pylist(as_messages), tmp_path / "pairs.parquet")  # parquet columns have one type
    a, stats = dpo.load_pairs(jsonl, tokenizer, max_len=256)
    b, _ = dpo.load_pairs(str(tmp_path / "pairs.parquet"), tokenizer, max_len=256)
    assert stats == {"pairs": 3, "bad": 0, "truncated": 0}
    assert [(p.prompt, p.chosen, p.rejected) for p in a] == [(p.prompt, p.chosen, p.rejected) for p in b]
    assert tokenizer.decode(a[1].prompt).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert a[0].chosen[-1] == tokenizer.eos_token_id


def test_long_responses_are_truncated_to_max_len(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2\n" * 20,
                                               "rejected": "no"}])
    pairs, stats = dpo.load_pairs(path, tokenizer, max_len=40)
    assert stats["truncated"] == 1
    assert len(pairs[0].prompt) + len(pairs[0].chosen) == 40


@pytest.mark.parametrize("row, where", [
    ('{"prompt": "hi", "chosen": "a"', "line 2: not valid JSON"),
    ({"prompt": "hi", "rejected": "b"}, "line 2: field 'chosen' is missing"),
    ({"prompt": "hi", "chosen": "a", "rejected": 3}, "line 2: field 'rejected' must be a non-empty string (got int)"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' message 0 must be"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' is empty"),
    ({"prompt": "hi " * 200, "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' is"),
    ([1, 2], "line 2: must be an object"),
])
def test_bad_rows_fail_with_one_line_naming_file_row_field(tmp_path, tokenizer, row, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [toy_rows(1)[0], row])
    with pytest.raises(DPOError) as info:
        dpo.load_pairs(path, tokenizer, max_len=64)
    message = str(info.value)
    assert message.startswith(f"{path} {where}") and "\n" not in message


def test_bad_parquet_row_is_named_by_row_index(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = toy_rows(3)
    rows[2]["chosen"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(DPOError, match=r"p\.parquet row 2: field 'chosen' must be a non-empty string \(got NoneType\)"):
        dpo.load_pairs(str(tmp_path / "p.parquet"), tokenizer, max_len=64)


def test_skip_bad_rows_counts_them(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", toy_rows(2) + ["not json", {"prompt": "x", "chosen": "", "rejected": "b"}])
    pairs, stats = dpo.load_pairs(path, tokenizer, max_len=64, skip_bad_rows=True)
    assert len(pairs) == 2 and stats["bad"] == 2
    assert "skipped 2 bad rows (first: " in capsys.readouterr().err


def test_main_reports_bad_rows_and_options_in_one_line(tmp_path, tok_dir, tokenizer):
    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    dpo.save_tokenizer(tokenizer, model_dir)
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": ["a"], "rejected": "b"}])
    with pytest.raises(SystemExit) as info:
        dpo.main(["--model", str(model_dir), "--data", data, "--out", str(tmp_path / "out"), "--no-progress"])
    assert str(info.value) == (f"verl-mtp dpo: error: {data} line 1: field 'chosen' must be a non-empty string "
                               f"(got list)")
    with pytest.raises(SystemExit, match=r"^verl-mtp dpo: error: --beta must be > 0 \(got 0.0\)$"):
        dpo.main(["--model", str(model_dir), "--data", data, "--beta", "0"])


def test_reference_is_scored_once_before_training(tokenizer):
    pairs, _ = load_toy(tokenizer, 10)
    policy, reference = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, mtp_layers=0, seed=1)
    calls = []
    reference.register_forward_hook(lambda *_: calls.append("ref"))
    policy.register_forward_hook(lambda *_: calls.append("policy"))
    cfg = config(batch_size=4, epochs=3, kl_coef=0.1)
    dpo.train_dpo(policy, tokenizer, pairs, cfg, reference=reference, progress=False)
    batches = math.ceil(len(pairs) / max(cfg.batch_size, 16))
    assert calls.count("ref") == batches  # chosen and rejected scored in one forward per batch
    assert calls[:batches] == ["ref"] * batches  # all of it before the first policy forward
    assert calls.count("policy") == 2 * 3 * math.ceil(10 / 4)  # chosen + rejected, per micro-batch, per epoch
    # the stored values are the reference's own log-probabilities
    ids = torch.tensor([pairs[0].prompt + pairs[0].chosen])
    with torch.no_grad():
        logps = torch.log_softmax(reference(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert pairs[0].ref_chosen == pytest.approx(logps[len(pairs[0].prompt) - 1:].tolist(), abs=1e-5)


def test_initial_policy_as_reference_gives_zero_rewards_at_the_start(tokenizer):
    pairs, _ = load_toy(tokenizer, 6)
    policy = tiny_model(tokenizer)
    first = []
    dpo.train_dpo(policy, tokenizer, pairs, config(batch_size=6, max_steps=1), progress=False,
                  on_step=lambda step, m: first.append(m))
    assert first[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert first[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)


def load_toy(tokenizer, n, seed=0):
    rows = toy_rows(n, seed)
    return [dpo.PreferencePair(*_encode(tokenizer, r)) for r in rows], rows


def _encode(tokenizer, row):
    from verl_mtp.data.tokenizer import encode_chat, encode_response

    return (encode_chat(tokenizer, [{"role": "user", "content": row["prompt"]}]),
            encode_response(tokenizer, row["chosen"]), encode_response(tokenizer, row["rejected"]))


def test_gradient_accumulation_equals_one_big_batch(tokenizer):
    pairs, _ = load_toy(tokenizer, 8)
    base = tiny_model(tokenizer)
    dpo.score_reference(base, pairs, tokenizer.pad_token_id)
    cfg = config(kl_coef=0.5, mtp_scale=0.3, mtp_detach=False, grad_clip=0.0)
    results = []
    for micro_batches in ([pairs], [pairs[:2], pairs[2:4], pairs[4:6], pairs[6:]]):
        policy = copy.deepcopy(base).train()
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)  # plain SGD: the update is the gradient
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        metrics = dpo.train_step(policy, opt, sched, micro_batches, cfg, tokenizer.pad_token_id)
        results.append((policy.state_dict(), metrics))
    (big, big_metrics), (small, small_metrics) = results
    for name, t in big.items():
        assert torch.allclose(t, small[name], atol=1e-6), name
    assert big_metrics.keys() == small_metrics.keys()
    for key, value in big_metrics.items():
        assert small_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("mtp_scale, detach", [(0.0, True), (0.5, True), (0.5, False)])
def test_mtp_loss_reaches_the_trunk_only_when_not_detached(tokenizer, mtp_scale, detach):
    pairs, _ = load_toy(tokenizer, 4)
    policy = tiny_model(tokenizer)
    before = copy.deepcopy(policy.state_dict())
    without_mtp = copy.deepcopy(policy)
    one_step = dict(max_steps=1, lr=1e-2, grad_clip=1e-3)  # clipping active: it must not couple the two
    dpo.train_dpo(without_mtp, tokenizer, copy.deepcopy(pairs), config(**one_step), progress=False)
    dpo.train_dpo(policy, tokenizer, pairs, config(**one_step, mtp_scale=mtp_scale, mtp_detach=detach), progress=False)
    after, plain = policy.state_dict(), without_mtp.state_dict()
    mtp_changed = any(not torch.equal(before[n], after[n]) for n in after if ".mtp_layers." in n)
    trunk_as_without_mtp = all(torch.allclose(after[n], plain[n], atol=1e-7) for n in after if ".mtp_layers." not in n)
    assert mtp_changed == (mtp_scale > 0)
    assert trunk_as_without_mtp == (mtp_scale == 0 or detach)


def test_dpo_raises_the_margin_on_a_toy_preference(tokenizer):
    pairs, _ = load_toy(tokenizer, 24, seed=0)
    held_out, _ = load_toy(tokenizer, 8, seed=1)
    policy = tiny_model(tokenizer)
    dpo.score_reference(policy, held_out, tokenizer.pad_token_id)
    before = dpo.evaluate_dpo(policy, held_out, beta=0.1, pad_id=tokenizer.pad_token_id)
    history = []
    dpo.train_dpo(policy, tokenizer, pairs, config(batch_size=8, epochs=4, lr=3e-3), progress=False,
                  on_step=lambda step, m: history.append(m))
    after = dpo.evaluate_dpo(policy, held_out, beta=0.1, pad_id=tokenizer.pad_token_id)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert after["rewards/margins"] > 0.5 and after["rewards/accuracies"] == 1.0
    assert after["logps/chosen"] > before["logps/chosen"]  # learnt the chosen pattern, not only to avoid the other
    assert history[-1]["loss/dpo"] < history[0]["loss/dpo"]


def test_main_end_to_end_saves_a_loadable_checkpoint_with_tokenizer(tmp_path, tokenizer, capsys):
    model_dir = tmp_path / "sft"
    tiny_model(tokenizer).save_pretrained(model_dir)
    dpo.save_tokenizer(tokenizer, model_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(12))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", toy_rows(4, seed=3))
    out = tmp_path / "dpo"
    code = dpo.main(["--model", str(model_dir), "--data", data, "--eval-data", eval_data, "--out", str(out),
                     "--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--mtp-scale", "0.2", "--no-progress",
                     "--threads", "1", "--log-every", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "12 pairs (0 truncated, 0 bad)" in err and f"saved {out}: 6 steps" in err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", dpo.METRICS_FILE):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / dpo.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "kl/chosen", "mtp/loss_1",
            "train/lr"} <= set(lines[-1])
    loaded = MTPCausalLM.from_pretrained(out)
    assert loaded.num_mtp_layers == 2
    from verl_mtp.trainer.setup import load_tokenizer

    assert load_tokenizer(str(out)).encode("What is 1 + 2?") == tokenizer.encode("What is 1 + 2?")


def test_an_interrupted_run_resumes_bit_exactly_and_refuses_other_options(tokenizer, tmp_path):
    from dataclasses import replace

    cfg = config(out=str(tmp_path / "whole"), epochs=2, mtp_scale=0.2, schedule="cosine", warmup_ratio=0.2,
                 weight_decay=0.1, save_every=2)
    whole = tiny_model(tokenizer)
    dpo.train_dpo(whole, tokenizer, load_toy(tokenizer, 12)[0], cfg, progress=False)

    def crash(step, metrics):
        if step == 3:  # one step past the checkpoint of step 2: lost, and redone on resume
            raise RuntimeError("killed")

    cut = replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(RuntimeError, match="killed"):
        dpo.train_dpo(tiny_model(tokenizer), tokenizer, load_toy(tokenizer, 12)[0], cut, progress=False, on_step=crash)
    steps = []
    resumed = tiny_model(tokenizer)  # the initial policy again: it scores the same reference log-probs
    dpo.train_dpo(resumed, tokenizer, load_toy(tokenizer, 12)[0], cut, progress=False,
                  on_step=lambda step, m: steps.append(step))
    assert steps == [3, 4, 5, 6]
    for name, t in whole.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name

    def lines(folder):
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (tmp_path / folder / dpo.METRICS_FILE).read_text().splitlines()]

    assert lines("cut") == lines("whole") and [r["step"] for r in lines("cut")] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(DPOError, match="written with --lr 0.003, this run has 0.001"):
        dpo.train_dpo(tiny_model(tokenizer), tokenizer, load_toy(tokenizer, 12)[0], replace(cut, lr=1e-3),
                      progress=False)


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tokenizer, tmp_path):
    import os
    import signal

    cfg = config(out=str(tmp_path / "dpo"), epochs=2, save_every=0)

    def ctrl_c(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        dpo.train_dpo(tiny_model(tokenizer), tokenizer, load_toy(tokenizer, 12)[0], cfg, progress=False, on_step=ctrl_c)
    steps = []
    dpo.train_dpo(tiny_model(tokenizer), tokenizer, load_toy(tokenizer, 12)[0], cfg, progress=False,
                  on_step=lambda step, m: steps.append(step))
    assert steps == [4, 5, 6]  # resumed after the step the interrupt arrived in
