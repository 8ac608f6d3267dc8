"""Synthetic multi-step arithmetic task for the CPU quickstart.

Every problem is solved by a short chain of `x op y = z` lines ending in `Answer: N`;
a ~1M parameter model trained for minutes on 2 CPU cores learns the format quickly and,
given ~4000 SFT steps, the arithmetic too (carries are the last thing it gets right).

    level 1   What is 17 + 5?                              one step
    level 2   What is 17 + 5 - 9?                          two steps
    level 3   Tom has 12 apples. He buys 5, gives away 3   three steps, word problem
              and finds 4. How many apples does Tom have now?

All numbers stay non-negative and below 100, so responses fit in ~40 tokens with
single-digit tokenization. Generation is a pure function of (n, seed, levels, exclude).

The SFT corpus can come from a fallible teacher (`teacher_slip=p`): at every line that needs a
carry (`38 + 16`) or a borrow (`52 - 17`) the teacher drops it with probability p, writes
`38 + 16 = 44`, and carries on from its wrong value, so the trace stays self-consistent but its
answer is wrong. An SFT model trained to convergence imitates the slips; RL with the exact
reward is what removes them. The RL and test sets always hold the true answers.

`trace_forms="mixed"` (the quickstart's shift scenario) varies the teacher's layout: every gap of a
line (`17 + 5 = 22`, `17+5 =  22`, `17  +5=22`, ...) and the one after `Answer:` holds no, one or two
spaces, uniformly and independently, so a model trained on the corpus writes that mixture at each gap,
and a reward that prefers one layout can move the policy at every gap (with spaces as tokens of their
own, half the positions of a compact line). The default, `fixed`, is one space in every gap.

Run as a script to write the quickstart data:

    python -m verl_mtp.data.synthetic_math OUT_DIR [--n-train N] [--n-test N] [--n-sft N] [--seed S]
                                                   [--teacher-slip P] [--trace-forms fixed|mixed]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence

DATA_SOURCE = "synthetic_math"
DATA_SOURCES = (DATA_SOURCE, "synthetic_math_chat")  # the reward routing grades each (rewards/scorers)
ABILITY = "math"
TRACE_FORMS = ("fixed", "mixed")  # one space in every gap, or 0-2 spaces per gap (module doc)

_NAMES = (("Tom", "He"), ("Sam", "He"), ("Ben", "He"), ("Max", "He"),
          ("Ann", "She"), ("Mia", "She"), ("Eva", "She"), ("Lily", "She"))
_ITEMS = ("apples", "pens", "cards", "coins", "books", "marbles", "stickers", "shells")
_GAIN_VERBS = ("buys", "finds", "gets", "wins")
_LOSS_VERBS = ("gives away", "loses", "sells")


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def _chain(rng: random.Random, start: int, steps: int, max_operand: int) -> list[tuple[str, int]]:
    """Random (op, operand) steps whose running value never goes negative."""
    value, chain = start, []
    for _ in range(steps):
        op = rng.choice("+-") if value > 0 else "+"
        operand = rng.randint(1, max_operand) if op == "+" else rng.randint(1, min(value, max_operand))
        chain.append((op, operand))
        value = _apply(value, op, operand)
    return chain


def _needs_carry(x: int, op: str, y: int) -> bool:
    """The units column carries (addition) or borrows (subtraction)."""
    return x % 10 + y % 10 >= 10 if op == "+" else x % 10 < y % 10


def _in_range(value: int, chain: Sequence[tuple[str, int]]) -> bool:
    """`value` and every running value of `chain` applied to it stay in [0, 100)."""
    for op, operand in chain:
        if not 0 <= value < 100:
            return False
        value = _apply(value, op, operand)
    return 0 <= value < 100


def _trace(start: int, chain: Sequence[tuple[str, int]], slip: float = 0.0,
           rng: random.Random | None = None, gaps: random.Random | None = None) -> tuple[str, int]:
    """The step-by-step solution text and its final value; with `slip > 0` each carry or borrow is
    dropped with that probability (the tens digit is written as if the units column did not overflow),
    unless that would take a later value out of [0, 100), a range the task never leaves. With `gaps`,
    each gap is 0, 1 or 2 spaces drawn from it (trace_forms="mixed"); without, always one space."""
    def gap() -> str:
        return " " if gaps is None else " " * gaps.randrange(3)

    lines, value = [], start
    for i, (op, operand) in enumerate(chain):
        result = _apply(value, op, operand)
        if slip and _needs_carry(value, op, operand) and rng.random() < slip:
            slipped = result + (-10 if op == "+" else 10)
            if _in_range(slipped, chain[i + 1:]):
                result = slipped
        lines.append(f"{value}{gap()}{op}{gap()}{operand}{gap()}={gap()}{result}")
        value = result
    lines.append(f"Answer:{gap()}{value}")
    return "\n".join(lines), value


def _expression_question(start: int, chain: Sequence[tuple[str, int]]) -> str:
    terms = " ".join(f"{op} {operand}" for op, operand in chain)
    return f"What is {start} {terms}?"


def _word_question(rng: random.Random, start: int, chain: Sequence[tuple[str, int]]) -> str:
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    actions = [f"{rng.choice(_GAIN_VERBS if op == '+' else _LOSS_VERBS)} {operand}" for op, operand in chain]
    listed = ", ".join(actions[:-1]) + " and " + actions[-1]
    return (f"{name} has {start} {item}. {pronoun} {listed}. "
            f"How many {item} does {name} have now?")


def _level1(rng: random.Random) -> tuple[str, int, list[tuple[str, int]]]:
    start = rng.randint(0, 20)
    return "expr", start, _chain(rng, start, steps=1, max_operand=20)


def _level2(rng: random.Random) -> tuple[str, int, list[tuple[str, int]]]:
    start = rng.randint(1, 30)
    return "expr", start, _chain(rng, start, steps=2, max_operand=30)


def _level3(rng: random.Random) -> tuple[str, int, list[tuple[str, int]]]:
    start = rng.randint(5, 30)
    return "word", start, _chain(rng, start, steps=3, max_operand=10)


LEVELS = {1: _level1, 2: _level2, 3: _level3}


def make_problem(rng: random.Random, level: int) -> dict:
    """One problem dict: question, solution (ends in 'Answer: N'), answer, level, and the start value and
    (op, operand) chain the solution is computed from."""
    if level not in LEVELS:
        raise ValueError(f"unknown synthetic_math level {level!r}; known: {sorted(LEVELS)}")
    kind, start, chain = LEVELS[level](rng)
    question = _expression_question(start, chain) if kind == "expr" else _word_question(rng, start, chain)
    solution, answer = _trace(start, chain)
    return {"question": question, "solution": solution, "answer": answer, "level": level,
            "start": start, "chain": chain}


def generate_problems(n: int, seed: int, levels: Sequence[int] = (1, 2, 3),
                      exclude: Iterable[str] = (), unique: bool = False) -> list[dict]:
    """`n` problems, deterministic in all arguments.

    Levels are assigned round-robin over `levels` (so repeating a level weights it, e.g.
    `(1, 1, 2, 3)`), then the list is shuffled. Questions in `exclude` are never produced;
    `unique=True` also forbids repeats within the result (used for held-out test sets).
    """
    rng = random.Random(seed)
    banned = set(exclude)
    problems = []
    for i in range(n):
        problems.append(_draw(rng, levels[i % len(levels)], banned, i))
        if unique:
            banned.add(problems[-1]["question"])
    rng.shuffle(problems)
    return problems


def _draw(rng: random.Random, level: int, banned: set[str], index: int) -> dict:
    # Level 1 has only ~630 distinct questions; give up loudly instead of looping forever.
    for _ in range(1000):
        problem = make_problem(rng, level)
        if problem["question"] not in banned:
            return problem
    raise ValueError(f"synthetic_math: ran out of distinct level-{level} questions at problem {index}; "
                     f"ask for fewer problems or more levels")


def split_problems(n_train: int, n_test: int, seed: int,
                   levels: Sequence[int] = (1, 2, 3)) -> tuple[list[dict], list[dict]]:
    """Train and test problems with no question in common; test questions are unique."""
    test = generate_problems(n_test, _stream_seed(seed, "test"), levels, unique=True)
    train = generate_problems(n_train, _stream_seed(seed, "train"), levels, exclude=_questions(test))
    return train, test


def _stream_seed(seed: int, stream: str) -> int:
    # Distinct, non-overlapping streams: seed 0's test set must not be seed 1's train set.
    return 3 * seed + ("train", "test", "sft").index(stream)


def _questions(problems: Iterable[dict]) -> set[str]:
    return {p["question"] for p in problems}


def chat_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def to_rl_row(problem: dict, index: int, split: str, data_source: str = DATA_SOURCE) -> dict:
    """One row of verl's RL parquet format."""
    return {
        "data_source": data_source,
        "prompt": chat_prompt(problem["question"]),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": str(problem["answer"])},
        "extra_info": {"index": index, "level": problem["level"],
                       "solution": problem["solution"], "split": split},
    }


def write_rl_dataset(out_dir: str, n_train: int, n_test: int, seed: int,
                     levels: Sequence[int] = (1, 2, 3), n_sft: int = 0, teacher_slip: float = 0.0,
                     data_source: str = DATA_SOURCE, trace_forms: str = "fixed") -> dict[str, str]:
    """Write `train.parquet` and `test.parquet` (and `sft.jsonl` if `n_sft > 0`, written by a teacher
    that drops carries with probability `teacher_slip` and lays its traces out as `trace_forms` says).

    The SFT corpus never contains a test question, so evaluation measures generalisation
    rather than recall. Returns the written paths by split name.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    train, test = split_problems(n_train, n_test, seed, levels)
    paths = {}
    for split, problems in (("train", train), ("test", test)):
        rows = [to_rl_row(p, i, split, data_source) for i, p in enumerate(problems)]
        paths[split] = os.path.join(out_dir, f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), paths[split])
    if n_sft > 0:
        paths["sft"] = write_sft_corpus(os.path.join(out_dir, "sft.jsonl"), n_sft, _stream_seed(seed, "sft"),
                                        levels, exclude=_questions(test), teacher_slip=teacher_slip,
                                        trace_forms=trace_forms)
    return paths


def write_sft_corpus(path: str, n: int, seed: int, levels: Sequence[int] = (1, 2, 3),
                     exclude: Iterable[str] = (), teacher_slip: float = 0.0, trace_forms: str = "fixed") -> str:
    """JSONL lines `{"prompt": [chat messages], "response": solution}`; returns `path`.

    `teacher_slip` in [0, 1]: the probability that the teacher drops each carry or borrow; `trace_forms`:
    `fixed` or `mixed` layout (module doc).
    """
    if not 0.0 <= teacher_slip <= 1.0:
        raise ValueError(f"teacher_slip must be in [0, 1], got {teacher_slip}")
    if trace_forms not in TRACE_FORMS:
        raise ValueError(f"trace_forms must be one of {', '.join(TRACE_FORMS)}, got {trace_forms!r}")
    slips = random.Random(seed + 1)  # its own stream: the problems are the same at every slip rate
    gaps = random.Random(seed + 2) if trace_forms == "mixed" else None  # and the slips at every layout
    with open(path, "w", encoding="utf-8") as f:
        for problem in generate_problems(n, seed, levels, exclude=exclude):
            solution = _trace(problem["start"], problem["chain"], teacher_slip, slips, gaps)[0]
            record = {"prompt": chat_prompt(problem["question"]), "response": solution}
            f.write(json.dumps(record) + "\n")
    return path


def iter_corpus_text(n: int, seed: int, levels: Sequence[int] = (1, 2, 3)) -> Iterator[str]:
    """Plain texts for tokenizer training: each turn as the chat template lays it out.

    The role names are kept because the template writes them as plain text, and we want
    `user` and `assistant` to become single tokens.
    """
    for problem in generate_problems(n, seed, levels):
        yield f"user\n{problem['question']}"
        yield f"assistant\n{problem['solution']}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--n-sft", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--teacher-slip", type=float, default=0.0,
                        help="probability that the SFT corpus's teacher drops a carry or borrow (0: a perfect teacher)")
    parser.add_argument("--data-source", default=DATA_SOURCE, choices=DATA_SOURCES,
                        help="graded from an 'Answer: N' line (synthetic_math, what our SFT model is taught) or from "
                             "the last integer of a chat model's own reply (synthetic_math_chat)")
    parser.add_argument("--trace-forms", default="fixed", choices=TRACE_FORMS,
                        help="the SFT teacher's layout: one space in every gap, or 0, 1 or 2 per gap")
    args = parser.parse_args(argv)
    if not 0.0 <= args.teacher_slip <= 1.0:
        parser.error(f"--teacher-slip must be in [0, 1], got {args.teacher_slip}")
    paths = write_rl_dataset(args.out_dir, args.n_train, args.n_test, args.seed, args.levels, args.n_sft,
                             args.teacher_slip, args.data_source, args.trace_forms)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
