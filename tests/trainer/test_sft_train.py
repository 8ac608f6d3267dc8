"""SFT stage: a tiny run learns, resume is bitwise exact, EMA is what gets saved, the folder loads."""

import json
import os
import signal
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from verl_mtp.data.synthetic_math import write_rl_dataset
from verl_mtp.models import MTPCausalLM
from verl_mtp.trainer.sft import (SFTConfig, build_model, collate, evaluate_accuracy, load_corpus,
                                  prepare_tokenizer, sft_loss, train_sft)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_data")
    write_rl_dataset(str(out), n_train=8, n_test=8, seed=0, levels=(1,), n_sft=240)
    return out


def tiny(data_dir, out, **kw) -> SFTConfig:
    base = dict(data=str(data_dir / "sft.jsonl"), out=str(out), test_data=None, hidden=32, layers=2, heads=4,
                kv_heads=2, intermediate=64, mtp_layers=2, steps=12, batch_size=16, lr=1e-2, warmup=2,
                val_size=32, eval_every=4, log_every=2, save_every=4)
    base.update(kw)
    return SFTConfig(**base)


def read_metrics(out):
    return [json.loads(line) for line in open(out / "sft_metrics.jsonl")]


def test_tiny_run_lowers_lm_and_mtp_loss(data_dir, tmp_path):
    final = train_sft(tiny(data_dir, tmp_path, steps=30, eval_every=10), progress=False)
    train = [m for m in read_metrics(tmp_path) if "train/loss" in m and "final" not in m]
    val = [m for m in read_metrics(tmp_path) if "val/loss" in m and "final" not in m]
    assert final["step"] == 30 and final["interrupted"] == 0
    assert train[-1]["train/loss"] < 0.7 * train[0]["train/loss"]
    for k in (1, 2):
        assert train[-1][f"mtp/loss_{k}"] < 0.7 * train[0][f"mtp/loss_{k}"]
        assert 0 <= final[f"val/mtp/acc_{k}"] <= 1
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    assert final["perf/tokens_per_s"] > 0


def _interrupt_at(step_to_stop):
    def on_step(step, metrics):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: handled at the step boundary
    return on_step


def test_resume_after_ctrl_c_matches_uninterrupted_run_bitwise(data_dir, tmp_path):
    kw = dict(ema=0.9, grad_accum=2, steps=10)  # EMA state and accumulation must survive the resume too
    whole = train_sft(tiny(data_dir, tmp_path / "whole", **kw), progress=False)
    first = train_sft(tiny(data_dir, tmp_path / "cut", **kw), progress=False, on_step=_interrupt_at(5))
    assert first["interrupted"] == 1 and first["step"] == 5
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # interrupted: no final folder yet
    steps_seen = []
    second = train_sft(tiny(data_dir, tmp_path / "cut", **kw), progress=False,
                       on_step=lambda step, m: steps_seen.append(step))
    assert steps_seen == [6, 7, 8, 9, 10]
    assert second["train/loss"] == whole["train/loss"] and second["val/loss"] == whole["val/loss"]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "whole" / "checkpoint" / name)
        b = load_file(tmp_path / "cut" / "checkpoint" / name)
        assert all(torch.equal(a[n], b[n]) for n in a), name
    a = torch.load(tmp_path / "whole" / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(tmp_path / "cut" / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [m["step"] for m in read_metrics(tmp_path / "whole")]
    # EMA on: the saved folder holds the EMA weights, which differ from the raw ones
    saved = load_file(tmp_path / "whole" / "model.safetensors")
    ema = load_file(tmp_path / "whole" / "checkpoint" / "ema.safetensors")
    raw = load_file(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(saved[n], ema[n]) for n in ema)
    assert not torch.equal(ema["model.embed_tokens.weight"], raw["model.embed_tokens.weight"])


def test_rerun_of_a_finished_run_trains_no_further(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path, steps=4)
    train_sft(cfg, progress=False)
    steps_seen = []
    again = train_sft(cfg, progress=False, on_step=lambda step, m: steps_seen.append(step))
    assert steps_seen == [] and again["step"] == 4


def test_saved_folder_loads_with_model_and_autotokenizer(data_dir, tmp_path):
    from transformers import AutoTokenizer

    cfg = tiny(data_dir, tmp_path, steps=6, test_data=str(data_dir / "test.parquet"), eval_limit=4)
    final = train_sft(cfg, progress=False)  # no --tokenizer: trains one on the corpus into --out
    model = MTPCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.num_mtp_layers == 2 and model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings and model.config.eos_token_id == tok.eos_token_id == 3
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    assert 0 <= final["test/acc"] <= 1 and final["test/accept_length"] >= 1 and final["test/n"] == 4
    result = evaluate_accuracy(model, tok, str(data_dir / "test.parquet"), limit=4, speculative=2)
    assert result["acc"] == final["test/acc"]  # the saved weights are the evaluated ones
    assert set(result) >= {"acc", "acc/level_1", "accept_length", "tokens_per_s", "seconds", "n"}


def test_loss_mask_covers_response_and_eos_or_everything(data_dir, tmp_path):
    tok = prepare_tokenizer(tiny(data_dir, tmp_path), tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": [{"role": "user", "content": "What is 1 + 2?"}], "response": "Answer: 3"}\n'
                      'not json\n{"prompt": "What is 2 + 2?"}\n{"text": "1 + 1 = 2"}\n')
    examples, stats = load_corpus(str(corpus), tok, "response", 128)
    assert stats["bad"] == 2 and len(examples) == 2
    chat, text = examples
    n_response = len(tok.encode("Answer: 3", add_special_tokens=False)) + 1
    assert chat.loss_mask == [0] * (len(chat.ids) - n_response) + [1] * n_response
    assert chat.ids[-1] == tok.eos_token_id and text.loss_mask == [1] * len(text.ids)
    everything, _ = load_corpus(str(corpus), tok, "all", 128)
    assert everything[0].loss_mask == [1] * len(chat.ids)
    truncated, stats = load_corpus(str(corpus), tok, "response", 6)
    assert stats["too_long"] == 1 and len(truncated) == 1  # the chat row lost its whole response


def test_mtp_gradient_reaches_the_trunk_unless_detached(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path)
    tok = prepare_tokenizer(cfg, tmp_path)
    examples, _ = load_corpus(cfg.data, tok, "response", 128)
    ids, attention, mask = collate(examples[:4], tok.pad_token_id)
    for detach in (False, True):
        model = build_model(cfg, tok)
        _, mtp, _ = sft_loss(model, ids, attention, mask, 0.3, detach, float(mask.sum()))
        mtp.backward()
        trunk_grad = model.model.layers[0].mlp.up_proj.weight.grad
        assert (trunk_grad is not None and trunk_grad.abs().sum() > 0) is not detach


def test_resume_with_other_model_options_is_refused(data_dir, tmp_path):
    from verl_mtp.trainer.sft import SFTError

    cfg = tiny(data_dir, tmp_path, steps=2)
    train_sft(cfg, progress=False)
    with pytest.raises(SFTError, match="--hidden 32"):
        train_sft(replace(cfg, hidden=64, steps=4), progress=False)
    assert train_sft(replace(cfg, hidden=64, steps=2, resume=False), progress=False)["step"] == 2


def test_pretrain_on_all_tokens_then_sft_from_it(data_dir, tmp_path):
    pre = tiny(data_dir, tmp_path / "pre", loss_on="all", steps=6, mtp_layers=1)
    train_sft(pre, progress=False)
    first_loss = {}
    for name, init in (("sft", str(tmp_path / "pre")), ("scratch", None)):
        cfg = tiny(data_dir, tmp_path / name, init=init, tokenizer=str(tmp_path / "pre"), steps=1)
        train_sft(cfg, progress=False, on_step=lambda step, m: first_loss.setdefault(name, m["train/loss"]))
    assert first_loss["sft"] < first_loss["scratch"] - 0.5, first_loss  # starts from the pretrained weights
    model = MTPCausalLM.from_pretrained(tmp_path / "sft")
    assert model.num_mtp_layers == 2  # the pretrained folder had K=1; the second layer starts fresh
