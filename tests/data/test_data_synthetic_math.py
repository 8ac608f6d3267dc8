import json
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest

from verl_mtp.data.synthetic_math import (
    generate_problems, iter_corpus_text, split_problems, write_rl_dataset, write_sft_corpus)

STEP = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")
WORD_START = re.compile(r"has (\d+) ")
WORD_ACTION = re.compile(r"(buys|finds|gets|wins|gives away|loses|sells) (\d+)")
GAINS = {"buys", "finds", "gets", "wins"}


def question_steps(problem: dict) -> tuple[int, list[tuple[str, int]]]:
    """Start value and (op, operand) steps read back from the question text alone."""
    question = problem["question"]
    if question.startswith("What is "):
        tokens = question[len("What is "):-1].split()
        return int(tokens[0]), [(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2)]
    start = int(WORD_START.search(question).group(1))
    return start, [("+" if verb in GAINS else "-", int(n)) for verb, n in WORD_ACTION.findall(question)]


def test_same_seed_same_problems_and_different_seed_differs():
    assert generate_problems(60, seed=7) == generate_problems(60, seed=7)
    assert generate_problems(60, seed=7) != generate_problems(60, seed=8)


def test_trace_is_correct_arithmetic_of_the_question():
    for problem in generate_problems(600, seed=1):
        *steps, last = problem["solution"].split("\n")
        assert last == f"Answer: {problem['answer']}"
        value, question_chain = question_steps(problem)
        assert len(steps) == len(question_chain) == problem["level"]
        for line, (op, operand) in zip(steps, question_chain):
            x, line_op, y, z = STEP.match(line).groups()
            assert (int(x), line_op, int(y)) == (value, op, operand)
            value = value + operand if op == "+" else value - operand
            assert int(z) == value and 0 <= value < 100
        assert value == problem["answer"]


def test_levels_are_balanced_and_repeating_a_level_weights_it():
    assert Counter(p["level"] for p in generate_problems(300, seed=0)) == {1: 100, 2: 100, 3: 100}
    assert Counter(p["level"] for p in generate_problems(300, seed=0, levels=(1, 1, 3))) == {1: 200, 3: 100}


def test_unknown_level_and_exhausted_level_fail_clearly():
    with pytest.raises(ValueError, match="unknown synthetic_math level 9"):
        generate_problems(3, seed=0, levels=(9,))
    with pytest.raises(ValueError, match="ran out of distinct level-1 questions"):
        generate_problems(1000, seed=0, levels=(1,), unique=True)


def test_train_and_test_share_no_question_and_test_is_unique():
    train, test = split_problems(3000, 300, seed=0)
    test_questions = [p["question"] for p in test]
    assert len(set(test_questions)) == len(test_questions) == 300
    assert not set(test_questions) & {p["question"] for p in train}


def test_rl_parquet_schema(tmp_path):
    paths = write_rl_dataset(str(tmp_path), n_train=30, n_test=9, seed=3)
    for split, n in (("train", 30), ("test", 9)):
        table = pq.read_table(paths[split])
        assert table.num_rows == n
        assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        row = table.slice(0, 1).to_pylist()[0]
        assert row["data_source"] == "synthetic_math" and row["ability"] == "math"
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("?")
        assert row["reward_model"]["style"] == "rule"
        assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == 0
        assert row["extra_info"]["solution"].endswith(f"Answer: {row['reward_model']['ground_truth']}")
        assert row["extra_info"]["level"] in (1, 2, 3)


def test_sft_corpus_never_contains_a_test_question(tmp_path):
    paths = write_rl_dataset(str(tmp_path), n_train=10, n_test=200, seed=0, n_sft=2000)
    test_questions = {row["prompt"][0]["content"] for row in pq.read_table(paths["test"]).to_pylist()}
    with open(paths["sft"]) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2000
    assert records[0]["response"].split("\n")[-1].startswith("Answer: ")
    assert not test_questions & {r["prompt"][0]["content"] for r in records}


def test_write_sft_corpus_and_corpus_text_are_deterministic(tmp_path):
    a = write_sft_corpus(str(tmp_path / "a.jsonl"), 20, seed=5)
    b = write_sft_corpus(str(tmp_path / "b.jsonl"), 20, seed=5)
    assert open(a).read() == open(b).read()
    texts = list(iter_corpus_text(4, seed=0))
    assert len(texts) == 8 and texts[0].startswith("user\n") and texts[1].startswith("assistant\n")


def _carry(x: int, op: str, y: int) -> bool:
    return x % 10 + y % 10 >= 10 if op == "+" else x % 10 < y % 10


def _slip_corpus(tmp_path, slip: float) -> list[dict]:
    path = write_sft_corpus(str(tmp_path / f"slip{slip}.jsonl"), 3000, seed=4, teacher_slip=slip)
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_fallible_teacher_drops_carries_at_its_rate_and_stays_self_consistent(tmp_path):
    clean, half, always = (_slip_corpus(tmp_path, s) for s in (0.0, 0.5, 1.0))
    assert [r["prompt"] for r in half] == [r["prompt"] for r in clean]  # the same problems at every rate
    counts = {}
    for name, corpus in (("clean", clean), ("half", half), ("always", always)):
        carries = dropped = 0
        for record, truth in zip(corpus, clean):
            *lines, answer = record["response"].split("\n")
            value = None
            for line, true_line in zip(lines, truth["response"].split("\n")):
                x, op, y, z = STEP.match(line).groups()
                x, y, z = int(x), int(y), int(z)
                assert value is None or x == value  # each line starts from the teacher's previous value
                assert 0 <= z < 100
                exact = x + y if op == "+" else x - y
                if _carry(x, op, y):
                    carries += 1
                    dropped += z != exact
                    assert z in (exact, exact - 10 if op == "+" else exact + 10)
                else:
                    assert z == exact
                value = z
            assert answer == f"Answer: {value}"
        counts[name] = (carries, dropped)
    assert counts["clean"][1] == 0
    carries, dropped = counts["half"]
    assert carries > 1000 and 0.45 < dropped / carries < 0.55
    carries, dropped = counts["always"]
    assert dropped / carries > 0.85


def test_teacher_slip_out_of_range_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_slip must be in \[0, 1\], got 1.5"):
        write_sft_corpus(str(tmp_path / "x.jsonl"), 3, seed=0, teacher_slip=1.5)


def test_mixed_trace_forms_space_every_gap_by_its_own_draw(tmp_path):
    """trace_forms='mixed' (the quickstart's shift scenario): the same problems, slips and values as the
    fixed layout, only each of a line's four gaps and the one after `Answer:` holds 0, 1 or 2 spaces,
    uniformly and independently (so every layout of a line occurs)."""
    def corpus(forms):
        path = write_sft_corpus(str(tmp_path / f"{forms}.jsonl"), 2000, seed=3, teacher_slip=0.5, trace_forms=forms)
        return [json.loads(line) for line in open(path)]

    fixed, mixed = corpus("fixed"), corpus("mixed")
    assert [r["prompt"] for r in mixed] == [r["prompt"] for r in fixed]
    assert [r["response"].replace(" ", "") for r in mixed] == [r["response"].replace(" ", "") for r in fixed]
    gaps, layouts = Counter(), Counter()
    for record in mixed:
        *lines, answer = record["response"].split("\n")
        for line in lines:
            _, a, _, b, _, c, d, _ = re.fullmatch(r"(\d+)( *)([+-])( *)(\d+)( *)=( *)(\d+)", line).groups()
            gaps.update([a, b, c, d])
            layouts[a, b, c, d] += 1
        gaps[re.fullmatch(r"Answer:( *)\d+", answer).group(1)] += 1
    assert set(gaps) == {"", " ", "  "} and all(0.3 < n / gaps.total() < 0.36 for n in gaps.values())
    assert len(layouts) == 81
    with pytest.raises(ValueError, match="trace_forms must be one of fixed, mixed, got 'spaced'"):
        write_sft_corpus(str(tmp_path / "x.jsonl"), 3, seed=0, trace_forms="spaced")
