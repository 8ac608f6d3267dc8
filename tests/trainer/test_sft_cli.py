"""`verl-mtp sft` argument handling: every mistake is one line naming the option."""

import json

import pytest

from verl_mtp.trainer.sft import SFTConfig, build_parser, main


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "response": "Answer: 2"}) + "\n")
    return str(path)


@pytest.mark.parametrize("args, expected", [
    (["--data", "/nonexistent/sft.jsonl"], "--data /nonexistent/sft.jsonl: no such file"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--loss-on", "prompt"], "argument --loss-on: invalid choice"),
    (["--heads", "4", "--kv-heads", "3"], "--heads must be a multiple of --kv-heads"),
    (["--ema", "1.5"], "--ema must be in [0, 1)"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok: no such folder"),
    (["--test-data", "/nonexistent/test.parquet"], "--test-data /nonexistent/test.parquet: no such file"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_arguments_give_one_line_errors(corpus, tmp_path, args, expected):
    argv = ["--data", corpus, "--out", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("verl-mtp sft: error: ") and "\n" not in message
    assert expected in message


def test_every_option_has_a_default_and_a_flag():
    defaults = vars(build_parser().parse_args([]))
    assert defaults.pop("threads") == 1
    assert SFTConfig(**defaults) == SFTConfig()
    assert SFTConfig().mtp_layers == 2 and SFTConfig().mtp_scale == 0.3 and not SFTConfig().mtp_detach
    assert build_parser().parse_args(["--no-tie-embeddings", "--bf16"]).tie_embeddings is False
