"""verl-format RL prompt data: loading with per-row validation, and a resumable prompt loader.

A row (parquet or JSONL, one object per line) has the columns verl uses:

    data_source   str                       which grader scores it
    prompt        [{"role", "content"}, ...]   chat messages (column name = data.prompt_key)
    reward_model  {"ground_truth": str | int | float | list, "style": ...}
    ability       str, optional
    extra_info    dict or null, optional    "index" is used as the item's index if present

Every row is checked when the dataset is built, so a bad row fails at start with one line
naming file, row (0-based; for JSONL, row i is line i + 1) and field, instead of deep in a
run. With `filter_invalid=True` bad rows are skipped and counted in `stats`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator

from verl_mtp.data.tokenizer import encode_chat

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("error", "left", "right", "filter")
_GROUND_TRUTH_TYPES = (str, int, float, list)


class DataError(ValueError):
    """Unusable data: one line naming the file, and the row and field where one is at fault."""


class RowError(ValueError):
    """A malformed row; `key` is a stable label for counting (no row-specific values)."""

    def __init__(self, field: str | None, reason: str, detail: str = ""):
        self.key = f"{field}: {reason}" if field else reason
        prefix = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{reason}{detail}")


def _as_file_list(files) -> list[str]:
    # data.train_files may be one path or a list (an omegaconf ListConfig included).
    if isinstance(files, (str, os.PathLike)):
        return [os.fspath(files)]
    paths = [os.fspath(f) for f in files]
    if not paths:
        raise DataError("data files: empty list; give at least one .parquet or .jsonl file")
    return paths


def _subset(rows: list, max_samples: int, shuffle: bool, seed: int) -> list:
    """`max_samples` of `rows` (all when it is <= 0 or not smaller): seeded random ones in file order when
    `shuffle`, else the first."""
    if max_samples <= 0 or max_samples >= len(rows):
        return rows
    if not shuffle:
        return rows[:max_samples]
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), max_samples))]


def _read_rows(path: str) -> Iterator[tuple[int, dict | str]]:
    """(row index, raw row): a dict from parquet, an unparsed line from JSONL."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: cannot read: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            yield from enumerate(pq.read_table(path).to_pylist())
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            # Blank lines (a trailing newline, say) are skipped but keep row i == line i + 1.
            yield from ((i, line) for i, line in enumerate(lines) if line.strip())
        else:
            raise ValueError("unsupported file type (expected .parquet or .jsonl)")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read: {message}") from None


def _as_record(raw: dict | str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RowError(None, "invalid JSON", f" ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise RowError(None, "not a JSON object", f", got {type(record).__name__}")
    return record


def _type_name(value) -> str:
    return type(value).__name__


def _check_prompt(prompt, key: str) -> list[dict]:
    if prompt is None:
        raise RowError(key, "missing")
    if not isinstance(prompt, list):
        raise RowError(key, "must be a list of chat messages", f", got {_type_name(prompt)}")
    if not prompt:
        raise RowError(key, "empty")
    for j, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise RowError(f"{key}[{j}]", "must be a {role, content} dict", f", got {_type_name(message)}")
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise RowError(f"{key}[{j}].{part}", "must be a str", f", got {_type_name(message.get(part))}")
    if not any(message["content"].strip() for message in prompt):
        raise RowError(key, "empty", " (every message content is blank)")
    return prompt


def _check_ground_truth(reward_model):
    if reward_model is None:
        raise RowError("reward_model", "missing")
    if not isinstance(reward_model, dict):
        raise RowError("reward_model", "must be a dict", f", got {_type_name(reward_model)}")
    truth = reward_model.get("ground_truth")
    if truth is None:
        raise RowError("reward_model.ground_truth", "missing")
    # bool is an int subclass, but a True/False answer is almost always a broken export.
    if isinstance(truth, bool) or not isinstance(truth, _GROUND_TRUTH_TYPES):
        raise RowError("reward_model.ground_truth", "must be str, int, float or list",
                       f", got {_type_name(truth)}")
    return truth


def validate_row(record: dict, prompt_key: str = "prompt") -> dict:
    """The fields an RL item needs, or RowError naming the first bad field."""
    prompt = _check_prompt(record.get(prompt_key), prompt_key)
    ground_truth = _check_ground_truth(record.get("reward_model"))
    data_source = record.get("data_source")
    if not isinstance(data_source, str):
        raise RowError("data_source", "must be a str", f", got {_type_name(data_source)}")
    ability = record.get("ability")
    if ability is not None and not isinstance(ability, str):
        raise RowError("ability", "must be a str or null", f", got {_type_name(ability)}")
    extra_info = record.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        raise RowError("extra_info", "must be a dict or null", f", got {_type_name(extra_info)}")
    return {"raw_prompt": prompt, "data_source": data_source, "ground_truth": ground_truth,
            "ability": ability, "extra_info": extra_info or {}}


def check_files(files, prompt_key: str = "prompt") -> int:
    """Read every row of `files` and check its fields (no tokenizer needed); the number of rows, or
    DataError naming file, row and field of the first bad one. Lets a run refuse bad data in a second,
    before it starts a cluster and loads a model."""
    rows = 0
    for path in _as_file_list(files):
        for row, raw in _read_rows(path):
            try:
                validate_row(_as_record(raw), prompt_key)
            except RowError as e:
                raise DataError(f"{path}: row {row}: {e}") from None
            rows += 1
    return rows


class RLDataset:
    """All valid rows of `files`, with prompts tokenized by the chat template.

    `truncation` applies when a prompt exceeds `max_prompt_length` tokens: `error` stops,
    `left` keeps the last tokens, `right` keeps the first ones, `filter` drops the row.
    `max_samples` > 0 keeps that many of the files' rows before anything is checked or filtered, as verl's
    `data.{train,val}_max_samples` do: a random subset drawn with `seed` when `shuffle`, else the first rows.
    """

    def __init__(self, files, tokenizer, prompt_key: str = "prompt", max_prompt_length: int | None = None,
                 truncation: str = "error", filter_invalid: bool = False, max_samples: int = -1,
                 shuffle: bool = False, seed: int = 0):
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"data.truncation={truncation!r}: expected one of {', '.join(TRUNCATION_MODES)}")
        self.tokenizer = tokenizer
        self.prompt_key = prompt_key
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.filter_invalid = filter_invalid
        self.files = _as_file_list(files)
        self.items: list[dict] = []
        self._invalid_reasons: Counter[str] = Counter()
        self.stats = {"num_rows": 0, "num_loaded": 0, "num_invalid": 0, "invalid_reasons": {},
                      "num_truncated": 0, "num_filtered_overlong": 0}
        rows = [(path, row, raw) for path in self.files for row, raw in _read_rows(path)]
        for path, row, raw in _subset(rows, max_samples, shuffle, seed):
            self._load_row(path, row, raw)
        self._finish_stats()

    def _load_row(self, path: str, row: int, raw) -> None:
        self.stats["num_rows"] += 1
        try:
            fields = validate_row(_as_record(raw), self.prompt_key)
        except RowError as e:
            if not self.filter_invalid:
                raise DataError(f"{path}: row {row}: {e}") from None
            self._invalid_reasons[e.key] += 1
            return
        input_ids = self._fit_length(encode_chat(self.tokenizer, fields["raw_prompt"]), path, row)
        if input_ids is not None:
            index = fields["extra_info"].get("index")
            index = len(self.items) if index is None else index
            self.items.append({"input_ids": input_ids, "index": index, **fields})

    def _fit_length(self, ids: list[int], path: str, row: int) -> list[int] | None:
        """`ids` cut to max_prompt_length per the truncation mode; None if filtered out."""
        limit = self.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.truncation == "error":
            raise DataError(f"{path}: row {row}: field '{self.prompt_key}': {len(ids)} tokens exceed "
                             f"data.max_prompt_length={limit} (data.truncation=left|right|filter to allow)")
        if self.truncation == "filter":
            self.stats["num_filtered_overlong"] += 1
            return None
        self.stats["num_truncated"] += 1
        return ids[-limit:] if self.truncation == "left" else ids[:limit]

    def _finish_stats(self) -> None:
        self.stats["invalid_reasons"] = dict(self._invalid_reasons)
        self.stats["num_invalid"] = sum(self._invalid_reasons.values())
        self.stats["num_loaded"] = len(self.items)
        skipped = self.stats["num_invalid"] + self.stats["num_filtered_overlong"]
        if not self.items:
            raise DataError(f"{', '.join(self.files)}: no usable rows ({self.stats})")
        if skipped:
            logger.warning("RL data: skipped %d of %d rows (%s)", skipped, self.stats["num_rows"], self.stats)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        # Callers may extend the ids (rollout appends the response); keep the stored copy intact.
        return {**item, "input_ids": list(item["input_ids"])}


class PromptLoader:
    """Endless batches of dataset items in a seeded order, resumable at batch granularity.

    Epoch e visits the items in a permutation fixed by (seed, e). `next_batch()` never
    runs out (it rolls into the next epoch); iterating the loader yields the rest of the
    current epoch. `state_dict()` after k batches restores a loader that continues with
    batch k + 1 exactly.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 key: str = "data.train_batch_size"):
        """`key`: the config key `batch_size` came from, named in errors."""
        if batch_size < 1:
            raise DataError(f"{key}={batch_size}: must be >= 1")
        if drop_last and len(dataset) < batch_size:
            raise DataError(f"{key}={batch_size}: the training set has only {len(dataset)} prompts, "
                             f"not enough for one batch (drop_last=True)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) cache

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def next_batch(self) -> list[dict]:
        self._roll_epoch_if_done()
        order = self._epoch_order()
        start = self.position * self.batch_size
        self.position += 1
        return [self.dataset[i] for i in order[start:start + self.batch_size]]

    def __iter__(self) -> Iterator[list[dict]]:
        self._roll_epoch_if_done()
        while self.position < len(self):
            yield self.next_batch()

    def _roll_epoch_if_done(self) -> None:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.dataset)
            if self.shuffle:
                import numpy as np

                order = np.random.default_rng([self.seed, self.epoch]).permutation(n).tolist()
            else:
                order = list(range(n))
            self._order = (self.epoch, order)
        return self._order[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"PromptLoader state: missing {sorted(missing)}")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"PromptLoader state: position {state['position']} is outside this "
                             f"loader's {len(self)} batches per epoch (did the data or batch size change?)")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None
