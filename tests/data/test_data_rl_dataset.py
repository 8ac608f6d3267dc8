import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_mtp.data.rl_dataset import DataError, RLDataset, check_files
from verl_mtp.data.synthetic_math import iter_corpus_text, write_rl_dataset
from verl_mtp.data.tokenizer import encode_chat, train_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out_dir = train_tokenizer(iter_corpus_text(1000, seed=0), str(tmp_path_factory.mktemp("tok")))
    return transformers.AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory):
    return write_rl_dataset(str(tmp_path_factory.mktemp("rl")), n_train=12, n_test=5, seed=0)


def good_row(i: int = 0) -> dict:
    return {"data_source": "synthetic_math", "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
            "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
            "extra_info": {"index": 100 + i}}


def write_jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_parquet_rows_load_with_tokenized_prompts(tokenizer, parquet_files):
    dataset = RLDataset(parquet_files["train"], tokenizer)
    rows = pq.read_table(parquet_files["train"]).to_pylist()
    assert len(dataset) == 12 and dataset.stats["num_loaded"] == 12 and dataset.stats["num_invalid"] == 0
    item = dataset[3]
    assert item["raw_prompt"] == rows[3]["prompt"]
    assert item["input_ids"] == encode_chat(tokenizer, rows[3]["prompt"])
    assert item["ground_truth"] == rows[3]["reward_model"]["ground_truth"]
    assert (item["data_source"], item["index"]) == ("synthetic_math", 3)
    assert item["extra_info"]["split"] == "train"


def test_several_files_and_jsonl_load_alike(tokenizer, parquet_files, tmp_path):
    jsonl = write_jsonl(tmp_path / "t.jsonl", pq.read_table(parquet_files["test"]).to_pylist())
    both = RLDataset([parquet_files["train"], jsonl], tokenizer)
    assert len(both) == 17
    assert [both[12 + i]["input_ids"] for i in range(5)] == \
        [item["input_ids"] for item in RLDataset(parquet_files["test"], tokenizer).items]


def test_custom_prompt_key_and_missing_optionals(tokenizer, tmp_path):
    row = good_row()
    row["messages"] = row.pop("prompt")
    del row["ability"], row["extra_info"]
    dataset = RLDataset(write_jsonl(tmp_path / "m.jsonl", [row]), tokenizer, prompt_key="messages")
    assert dataset[0]["extra_info"] == {} and dataset[0]["index"] == 0


def without(key: str) -> dict:
    row = good_row(1)
    del row[key]
    return row


def with_field(key: str, value) -> dict:
    return {**good_row(1), key: value}


BAD_ROWS = {
    "missing prompt": (without("prompt"), "field 'prompt': missing"),
    "prompt not a list": (with_field("prompt", "What is 1 + 1?"), "field 'prompt': must be a list"),
    "content not str": (with_field("prompt", [{"role": "user", "content": 5}]),
                        "field 'prompt[0].content': must be a str, got int"),
    "message not a dict": (with_field("prompt", ["hi"]), "field 'prompt[0]': must be a {role, content} dict"),
    "empty prompt": (with_field("prompt", []), "field 'prompt': empty"),
    "blank content": (with_field("prompt", [{"role": "user", "content": "  "}]), "field 'prompt': empty"),
    "missing ground_truth": (with_field("reward_model", {"style": "rule"}),
                             "field 'reward_model.ground_truth': missing"),
    "missing reward_model": (without("reward_model"), "field 'reward_model': missing"),
    "bool ground_truth": (with_field("reward_model", {"ground_truth": True}),
                          "field 'reward_model.ground_truth': must be str, int, float or list, got bool"),
    "data_source wrong type": (with_field("data_source", 7), "field 'data_source': must be a str, got int"),
    "extra_info wrong type": (with_field("extra_info", [1]), "field 'extra_info': must be a dict or null"),
    "bad JSON line": ('{"prompt": [', "invalid JSON"),
    "JSON not an object": ("[1, 2]", "not a JSON object, got list"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_fails_with_one_line_naming_file_row_and_field(tokenizer, tmp_path, kind):
    bad, expected = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row(0), bad, good_row(2)])
    with pytest.raises(DataError) as info:
        RLDataset(path, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}: row 1: {expected}") and "\n" not in message
    with pytest.raises(DataError) as before_any_tokenizer:  # the check a run makes before Ray starts
        check_files([path])
    assert str(before_any_tokenizer.value) == message
    assert check_files(write_jsonl(tmp_path / "good.jsonl", [good_row(0), good_row(1)])) == 2


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_is_skipped_and_counted_with_filter_invalid(tokenizer, tmp_path, kind):
    bad, _ = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row(0), bad, bad, good_row(2)])
    dataset = RLDataset(path, tokenizer, filter_invalid=True)
    assert [item["index"] for item in dataset.items] == [100, 102]
    assert dataset.stats["num_rows"] == 4 and dataset.stats["num_invalid"] == 2
    assert list(dataset.stats["invalid_reasons"].values()) == [2]


def test_missing_ground_truth_in_parquet_struct(tokenizer, tmp_path):
    rows = [good_row(0), with_field("reward_model", {"style": "rule", "ground_truth": None})]
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: field 'reward_model\.ground_truth': missing"):
        RLDataset(path, tokenizer)


@pytest.mark.parametrize("name, content, reason", [
    ("absent.parquet", None, "no such file"),
    ("broken.parquet", b"not parquet", "Parquet"),
    ("rows.csv", b"a,b\n", "unsupported file type"),
])
def test_unreadable_file_fails_with_one_line_naming_it(tokenizer, tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        RLDataset([str(path)], tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read: ") and reason in message and "\n" not in message


def test_all_rows_invalid_is_an_error_even_when_filtering(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [without("prompt")])
    with pytest.raises(ValueError, match="no usable rows"):
        RLDataset(path, tokenizer, filter_invalid=True)


@pytest.fixture
def mixed_lengths(tmp_path):
    long_row = with_field("prompt", [{"role": "user", "content": "What is " + " + ".join(["1"] * 20) + "?"}])
    return write_jsonl(tmp_path / "mixed.jsonl", [good_row(0), long_row, good_row(2)])


def test_truncation_error_names_file_row_and_limit(tokenizer, mixed_lengths):
    with pytest.raises(ValueError) as info:
        RLDataset(mixed_lengths, tokenizer, max_prompt_length=24, truncation="error")
    assert str(info.value).startswith(f"{mixed_lengths}: row 1: field 'prompt': ")
    assert "data.max_prompt_length=24" in str(info.value)


@pytest.mark.parametrize("mode", ["left", "right"])
def test_truncation_left_keeps_the_end_and_right_the_start(tokenizer, mixed_lengths, mode):
    full = RLDataset(mixed_lengths, tokenizer)[1]["input_ids"]
    dataset = RLDataset(mixed_lengths, tokenizer, max_prompt_length=24, truncation=mode)
    assert dataset[1]["input_ids"] == (full[-24:] if mode == "left" else full[:24])
    assert len(dataset) == 3 and dataset.stats["num_truncated"] == 1


def test_truncation_filter_drops_and_counts(tokenizer, mixed_lengths):
    dataset = RLDataset(mixed_lengths, tokenizer, max_prompt_length=24, truncation="filter")
    assert [item["index"] for item in dataset.items] == [100, 102]
    assert dataset.stats["num_filtered_overlong"] == 1


def test_unknown_truncation_mode(tokenizer, mixed_lengths):
    with pytest.raises(ValueError, match="data.truncation='middle'"):
        RLDataset(mixed_lengths, tokenizer, truncation="middle")


def test_items_are_returned_as_copies(tokenizer, mixed_lengths):
    dataset = RLDataset(mixed_lengths, tokenizer)
    dataset[0]["input_ids"].append(99)
    assert dataset[0]["input_ids"] == dataset.items[0]["input_ids"] and 99 not in dataset.items[0]["input_ids"]


def test_max_samples_caps_the_rows_before_they_are_checked(tokenizer, tmp_path):
    rows = [good_row(i) for i in range(10)] + [{**good_row(10), "prompt": "not a chat"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = RLDataset(path, tokenizer, max_samples=4)  # the bad last row is never read
    assert [item["index"] for item in first.items] == [100, 101, 102, 103] and first.stats["num_rows"] == 4
    drawn = RLDataset(path, tokenizer, max_samples=4, shuffle=True, seed=3, filter_invalid=True)
    again = RLDataset(path, tokenizer, max_samples=4, shuffle=True, seed=3, filter_invalid=True)
    other = RLDataset(path, tokenizer, max_samples=4, shuffle=True, seed=4, filter_invalid=True)
    indices = [item["index"] for item in drawn.items]
    assert indices == sorted(indices) and indices == [item["index"] for item in again.items]
    assert drawn.stats["num_rows"] == 4 and indices != [item["index"] for item in other.items]
    assert len(RLDataset(path, tokenizer, max_samples=-1, filter_invalid=True)) == 10
    assert len(RLDataset(path, tokenizer, max_samples=50, filter_invalid=True)) == 10
