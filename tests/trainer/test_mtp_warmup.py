"""MTP warm start: resumable collection, features equal to the full forward, accept length raised on a
frozen trunk (bitwise), soft labels, the diffusion objective, the report, the output folder and the CLI."""

import json

import pytest
import torch

from verl_mtp.algos.mtp_loss import compute_mtp_loss
from verl_mtp.models import MTPCausalLM, ModelConfig
from verl_mtp.models.toy import fit_markov, markov_batch
from verl_mtp.trainer import mtp_warmup, mtp_warmup_data
from verl_mtp.trainer.mtp_warmup import WarmupConfig, format_table, warm_start
from verl_mtp.trainer.mtp_warmup_data import (CollectSettings, Document, OnTheFlySource, ShardSource, WarmupError,
                                              collect, corpus_digest, detect_format, read_corpus, read_prompts,
                                              self_generate, trunk_fingerprint)
from verl_mtp.trainer.mtp_warmup_objectives import (alpha, chain_loss, diffusion_blocks, diffusion_mask, loss_weight,
                                                    mtp_hidden)

# small windows, every 4th document held out, greedy accept length over 16 held-out prompts
FAST = dict(sample_size=24, stride=12, batch_size=16, lr=3e-3, warmup_steps=5, eval_fraction=0.25,
            hidden_dtype="float32", accept_prompts=16, accept_max_new_tokens=40, log_every=1000)


@pytest.fixture(scope="module")
def chain():
    """A trunk trained on a Markov chain with no MTP layers (a base model), saved as an HF folder."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_nextn_predict_layers=0, max_position_embeddings=128)
    trunk, transitions = fit_markov(MTPCausalLM(cfg), steps=120, seq_len=24)
    docs = markov_batch(transitions, 48, 40, torch.Generator().manual_seed(1)).tolist()
    return trunk, docs


@pytest.fixture
def base_folder(chain, tmp_path):
    chain[0].save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _fresh(base_folder, k=2):
    torch.manual_seed(3)  # the fresh MTP layers' init
    return MTPCausalLM.from_pretrained(base_folder, num_mtp_layers=k)


def _settings(model, docs, **kw):
    base = dict(trunk=trunk_fingerprint(model), corpus=corpus_digest(docs), num_docs=len(docs), sample_size=16,
                stride=8, max_samples=None, max_length=128, hidden_dtype="float32", topk=4, shard_size=8,
                docs_per_batch=2)
    base.update(kw)
    return CollectSettings(**base)


def test_collection_resumes_after_interruption_with_identical_shards(chain, base_folder, tmp_path, monkeypatch):
    model = _fresh(base_folder)
    docs = [Document(d) for d in chain[1][:12]]
    settings = _settings(model, docs)
    whole = collect(model, docs, tmp_path / "whole", settings, log=lambda m: None)
    assert whole["complete"] and len(whole["shards"]) == 6 and whole["num_samples"] == 12 * 4  # 4 windows a doc

    real_write, calls = mtp_warmup_data.write_shard, []

    def dies_on_second_shard(path, samples):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, samples)

    monkeypatch.setattr(mtp_warmup_data, "write_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        collect(model, docs, tmp_path / "resumed", settings, log=lambda m: None)
    stopped = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not stopped["complete"] and len(stopped["shards"]) == 1 and stopped["next_doc"] == 2
    monkeypatch.setattr(mtp_warmup_data, "write_shard", real_write)
    said = []
    resumed = collect(model, docs, tmp_path / "resumed", settings, log=said.append)
    assert "resuming at document 2" in said[0]
    assert resumed == whole
    from safetensors.torch import load_file
    for shard in whole["shards"]:
        a, b = load_file(tmp_path / "whole" / shard["file"]), load_file(tmp_path / "resumed" / shard["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(a) >= {"hidden_states", "input_ids", "next_tokens", "topk_logprobs", "topk_indices", "loss_mask"}
    assert a["hidden_states"].shape == (8, 16, 32) and a["topk_indices"].shape == (8, 16, 4)
    with pytest.raises(WarmupError, match="stride=8, now 4"):
        collect(model, docs, tmp_path / "whole", _settings(model, docs, stride=4), log=lambda m: None)


def test_on_the_fly_features_equal_collected_and_full_forward(chain, base_folder, tmp_path):
    model = _fresh(base_folder)
    docs = [Document(d, target_start=5) for d in chain[1][:8]]
    collect(model, docs, tmp_path / "c", _settings(model, docs), log=lambda m: None)
    shards = list(ShardSource(tmp_path / "c", eval_every=4).batches("train", 5, shuffle=False, seed=0))
    fly = list(OnTheFlySource(model, docs, 4, 16, 8, None, 128, topk=4).batches("train", 5, shuffle=False, seed=0))
    assert len(shards) == len(fly) == 5  # 6 training documents x 4 windows
    for s, f in zip(shards, fly):
        assert torch.equal(s["input_ids"], f["input_ids"]) and torch.equal(s["loss_mask"], f["loss_mask"])
        assert torch.allclose(s["hidden_states"], f["hidden_states"], atol=1e-5)
        assert torch.equal(s["next_tokens"], f["next_tokens"])
    # MTP layers on stored h_0 == the model's own teacher-forced forward (windows at offset 0)
    first = shards[0]
    rows = first["offsets"] == 0
    batch = {k: v[rows] for k, v in first.items()}
    with torch.no_grad():
        full = model(batch["input_ids"])
        ours = [model.lm_head(h) for h in mtp_hidden(model, batch, 2)]
        for a, b in zip(ours, full.mtp_logits):
            assert torch.allclose(a, b, atol=1e-5)
        loss, _, moe = chain_loss(model, batch, 2, "ce", "data")
        assert moe == {}  # a dense model has no load-balancing term
        ref, _ = compute_mtp_loss(full.mtp_logits, batch["input_ids"], batch["loss_mask"])
    assert torch.allclose(loss, ref, atol=1e-5)  # response-only targets, same as the RL MTP loss


def test_warm_start_raises_accept_length_trunk_bitwise_unchanged_and_folder_loads(chain, base_folder, tmp_path):
    model = _fresh(base_folder)
    trunk = {n: t.clone() for n, t in model.state_dict().items() if ".mtp_layers." not in n}
    model, report = warm_start(model, None, chain[1], WarmupConfig(**FAST), run_dir=tmp_path / "run", steps=60,
                               batch_size=8, log=lambda m: None)
    before, after = report["before"]["accept"]["accept_length"], report["after"]["accept"]["accept_length"]
    assert before < 1.3 and after > 1.5, (before, after)  # measured: 1.17 -> 3.0
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in trunk.items())
    assert all(p.grad is None for n, p in model.named_parameters() if ".mtp_layers." not in n)
    assert all(p.requires_grad for p in model.parameters())  # flags restored for the RL that follows
    assert report["train"]["solo_first_layer_steps"] == 18  # MiMo: layer 0 alone, then copied
    rows = report["after"]["positions"]
    assert [r["position"] for r in rows] == [1, 2]
    assert all(r["batches"] >= 2 and {"accuracy_std", "loss_std"} <= r.keys() for r in rows)
    assert rows[0]["accuracy"] > report["before"]["positions"][0]["accuracy"]
    assert len(format_table(rows).splitlines()) == 2 + len(rows)  # header, rule, one row per position
    md = (tmp_path / "run" / "mtp_warmup_report.md").read_text()
    assert "| position | predicts | accuracy (%) | accuracy std | loss | loss std |" in md
    assert json.loads((tmp_path / "run" / "mtp_warmup_report.json").read_text())["after"]["positions"] == rows
    mtp_warmup.save_warm_model(model, report, tmp_path / "out")
    back = MTPCausalLM.from_pretrained(tmp_path / "out")
    assert back.num_mtp_layers == 2
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in model.state_dict().items())


def test_soft_labels_on_the_fly(chain, base_folder):
    model, report = warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**FAST), collect=False,
                               objective="soft", topk=6, steps=40, log=lambda m: None)
    before, after = report["before"]["positions"], report["after"]["positions"]
    assert all(a["loss"] < b["loss"] / 4 for a, b in zip(after, before))  # KL to the trunk's distribution
    assert report["after"]["accept"]["accept_length"] > 1.5


def test_tv_objective_on_the_fly(chain, base_folder):
    """RL's tv loss (1 - sum min(p, q)) against the trunk's top-k distribution; hand-checked on one row."""
    from verl_mtp.trainer.mtp_warmup_objectives import topk_tv

    # target top-2 of (.5, .3, .2): (.625, .375, 0); draft q = (.2, .3, .5): 1 - (.2 + .3) = .5
    row = topk_tv(torch.tensor([[0.2, 0.3, 0.5]]).log(), torch.tensor([[0.5, 0.3]]).log(), torch.tensor([[0, 1]]))
    assert row.item() == pytest.approx(0.5, abs=1e-6)
    model, report = warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**FAST), collect=False,
                               objective="tv", topk=6, steps=40, log=lambda m: None)
    before, after = report["before"]["positions"], report["after"]["positions"]
    assert all(a["loss"] < b["loss"] - 0.2 for a, b in zip(after, before)), (before, after)
    assert report["after"]["accept"]["accept_length"] > 1.5


def test_diffusion_blocks_and_masking():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0]]), "next_tokens": torch.tensor([[16, 17, 18, 19, 20, 21]]),
             "lengths": torch.tensor([5]), "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.uint8),
             "offsets": torch.tensor([10]), "hidden_states": torch.arange(6.0)[None, :, None].expand(1, 6, 3)}
    blocks = diffusion_blocks(batch, 3, "trunk")
    # anchors: positions whose block reaches a target (tokens 2..4): t = 0..3
    assert blocks["hidden"][:, 0].tolist() == [0, 1, 2, 3]
    assert blocks["tokens"][0].tolist() == [16, 17, 18]  # the trunk's greedy tokens at t, t+1, t+2
    assert blocks["target"][0].tolist() == [False, True, True]  # token 1 is prompt, 2 and 3 are targets
    assert blocks["inside"][2].tolist() == [True, True, False]  # t=2: tokens 3, 4, then past the end
    assert blocks["positions"][1].tolist() == [12, 13, 14]
    assert diffusion_blocks(batch, 3, "data")["tokens"][0].tolist() == [6, 7, 8]

    target = torch.ones(4000, 4, dtype=torch.bool)
    target[:, 3] = False
    g = torch.Generator().manual_seed(0)
    for schedule in ("linear", "kappa"):
        s = torch.full((4000,), 0.3)
        masked = diffusion_mask(target, s, schedule, g)
        assert not masked[:, 3].any()  # never a non-target
        assert abs(masked[:, :3].float().mean() - (1 - alpha(s[0], schedule))) < 0.03
    s = torch.tensor([0.1, 0.5])
    assert torch.allclose(loss_weight(s, "linear", "scheduler"), 1 / s)
    assert torch.allclose(loss_weight(s, "kappa", "scheduler"),
                          (torch.pi / 2) * torch.sin(torch.pi * s / 2) / (1 - torch.cos(torch.pi * s / 2)))
    assert torch.equal(loss_weight(s, "kappa", "ones"), torch.ones(2))
    assert alpha(torch.tensor(0.0), "kappa") == 1 and alpha(torch.tensor(1.0), "linear") == 0


def test_diffusion_objective_trains(chain, base_folder, tmp_path):
    model, report = warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**FAST), run_dir=tmp_path,
                               objective="diffusion", block_length=3, alpha_schedule="kappa", steps=50,
                               log=lambda m: None)
    before, after = report["before"]["positions"], report["after"]["positions"]
    assert len(after) == 3 and after[0]["predicts"] == "t+1"
    assert all(a["loss"] < b["loss"] for a, b in zip(after, before))
    assert after[1]["accuracy"] > 30  # block position 2 from h_t alone, all masked (measured 55 %, before 2 %)
    mtp_warmup.save_warm_model(model, report, tmp_path / "out")
    assert (tmp_path / "out" / "mtp_diffusion.safetensors").is_file()
    MTPCausalLM.from_pretrained(tmp_path / "out")  # the side file does not disturb loading


def test_cli_runs_and_errors_are_one_line(chain, base_folder, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in chain[1]))
    out = tmp_path / "run"
    args = ["--model", str(base_folder), "--data", str(corpus), "--out", str(out), "--num-mtp-layers", "1",
            "--sample-size", "24", "--stride", "12", "--steps", "30", "--lr", "3e-3", "--eval-fraction", "0.25",
            "--accept-prompts", "8", "--on-the-fly"]
    assert mtp_warmup.main(args) == 0
    printed = capsys.readouterr().out
    assert "| 1 | t+2 |" in printed and "Accept length" in printed
    assert MTPCausalLM.from_pretrained(out / "model").num_mtp_layers == 1
    report = json.loads((out / "mtp_warmup_report.json").read_text())
    assert report["after"]["accept"]["accept_length"] > report["before"]["accept"]["accept_length"]

    for bad, needle in [(["--data", str(tmp_path / "missing.jsonl")], "no such file"),
                        (["--sample-size", "2"], "sample_size=2 (--sample-size): must be >= 3"),
                        (["--objective", "mse"], "invalid choice"),
                        (["--data", str(out / "model")], "without manifest.json")]:
        argv = args + bad
        with pytest.raises(SystemExit) as e:  # one line, as every verl-mtp command reports a bad argument
            mtp_warmup.main(argv)
        err = str(e.value)
        assert err.startswith("verl-mtp mtp-warmup: error: ") and needle in err and "\n" not in err, err


class ByteTokenizer:
    """Enough of a tokenizer for the corpus readers: ids 4..23 from bytes, a plain chat template."""

    eos_token_id = 3

    def encode(self, text, add_special_tokens=False):
        return [4 + b % 20 for b in text.encode()]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']};" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_corpus_formats_and_self_generated_corpus(chain, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = ByteTokenizer()
    (tmp_path / "c.txt").write_text("first doc\n\nsecond\n")
    assert [d.ids for d in read_corpus(str(tmp_path / "c.txt"), "text", tok)] == [tok.encode("first doc"),
                                                                                 tok.encode("second")]
    rows = [{"text": "abc"}, {"input_ids": [5, 6, 7], "target_start": 1},
            {"prompt": [{"role": "user", "content": "q"}], "response": "ans"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "ans"}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist([{"text": "abc"}]), tmp_path / "t.parquet")
    assert detect_format(str(tmp_path / "c.jsonl")) == "jsonl"
    assert detect_format(str(tmp_path / "t.parquet")) == "parquet"
    text, ids, chat, sharegpt = read_corpus(str(tmp_path / "c.jsonl"), "jsonl", tok)
    assert text.target_start == 0 and ids == Document([5, 6, 7], 1)
    prompt = tok.encode("<user>q;<assistant>")
    assert chat.ids == prompt + tok.encode("ans") + [3] and chat.target_start == len(prompt)
    assert sharegpt.ids[:sharegpt.target_start] == prompt and sharegpt.ids[len(prompt):] == tok.encode("ans;")
    assert read_corpus(str(tmp_path / "t.parquet"), "parquet", tok) == [Document(tok.encode("abc"))]

    rl_rows = [{"data_source": "toy", "prompt": [{"role": "user", "content": f"question {i}"}],
                "reward_model": {"ground_truth": "1"}} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rl_rows), tmp_path / "rl.parquet")
    assert detect_format(str(tmp_path / "rl.parquet")) == "self"
    with pytest.raises(WarmupError, match="row 0: 'prompt' without 'response'.*--format self"):
        read_corpus(str(tmp_path / "rl.parquet"), "parquet", tok)
    prompts = read_prompts(str(tmp_path / "rl.parquet"), tok)
    docs = self_generate(chain[0], prompts, [3], temperature=0.0, max_new_tokens=6, seed=0)
    assert [d.ids[:d.target_start] for d in docs] == prompts
    assert all(len(d.ids) - d.target_start in range(1, 7) for d in docs)


def test_training_from_an_existing_collection_checks_the_trunk(chain, base_folder, tmp_path):
    model = _fresh(base_folder, k=1)
    docs = [Document(d) for d in chain[1]]
    collect(model, docs, tmp_path / "c", _settings(model, docs, topk=0, sample_size=24, stride=12),
            log=lambda m: None)
    source = ShardSource(tmp_path / "c", eval_every=4)
    _, report = warm_start(model, None, source, WarmupConfig(**FAST), steps=20, log=lambda m: None)
    assert report["eval_samples"] == 12 * 3 and len(report["after"]["positions"]) == 1
    with pytest.raises(WarmupError, match="needs top-k targets"):
        warm_start(model, None, source, WarmupConfig(**FAST), objective="soft", log=lambda m: None)
    other = _fresh(base_folder, k=1)
    with torch.no_grad():
        other.model.norm.weight.mul_(2)
    with pytest.raises(WarmupError, match="different trunk"):
        warm_start(other, None, source, WarmupConfig(**FAST), log=lambda m: None)


def test_moe_mtp_layers_get_the_balance_loss_and_metrics():
    from verl_mtp.models import MTPCausalLM, ModelConfig
    from verl_mtp.trainer.mtp_warmup_objectives import chain_loss

    torch.manual_seed(0)
    model = MTPCausalLM(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, num_nextn_predict_layers=2,
                                    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    router_aux_loss_coef=0.01))
    ids = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        hidden = model(ids).hidden_states
    batch = {"input_ids": ids, "hidden_states": hidden, "next_tokens": ids.roll(-1, 1),
             "loss_mask": torch.ones_like(ids), "lengths": torch.tensor([12, 9]), "offsets": torch.zeros(2, dtype=torch.long)}
    loss, _, moe = chain_loss(model, batch, 2, "ce", "data")
    assert moe["moe/aux_loss"] > 0 and "moe/expert_load_0" in moe
    loss.backward()
    assert model.model.mtp_layers[1].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["ce", "diffusion"])
def test_interrupted_training_resumes_bit_exactly(chain, base_folder, tmp_path, objective):
    """ce: layer 0 trains alone for 3 steps, then is copied (before the checkpoint of step 4); diffusion: the
    mask embedding and the masking RNG come back too."""
    settings = dict(FAST, objective=objective, steps=12, save_every=4, log_every=1, accept_prompts=2)

    def interrupt_at_step_6(message):
        if message.startswith("step 6/"):
            raise KeyboardInterrupt

    whole, _ = warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**settings), run_dir=tmp_path / "a",
                          log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**settings), run_dir=tmp_path / "b",
                   log=interrupt_at_step_6)
    messages = []
    resumed, report = warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**settings),
                                 run_dir=tmp_path / "b", log=messages.append)
    assert any("at step 4" in m for m in messages) and report["train"]["steps"] == 12
    for name, t in whole.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    with pytest.raises(WarmupError, match=r"written with lr=0.003 \(--lr\), this run has 0.001"):
        warm_start(_fresh(base_folder), None, chain[1], WarmupConfig(**{**settings, "lr": 1e-3}),
                   run_dir=tmp_path / "b", log=lambda m: None)
