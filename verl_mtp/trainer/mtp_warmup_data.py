"""Data for the MTP warm start: corpora in, frozen-trunk features out (in shards on disk, or on the fly).

A *document* is a token list whose training targets start at `target_start` (0 for plain text; the first
response token for chat rows, so the heads learn on what rollouts generate). A *sample* is a window of
`sample_size` tokens at `offset` in its document, with what the frozen trunk computed there:

    hidden_states  (N, S, H)  trunk output after the final norm: h_0 of the MTP layers
    input_ids      (N, S)     the window's tokens, right-padded with 0
    next_tokens    (N, S)     the trunk's greedy next token at each position (argmax of its logits)
    loss_mask      (N, S)     1 where a token may be a training target (in the document, >= target_start)
    lengths        (N,)       valid tokens in the window
    offsets        (N,)       position of the window's first token in its document (RoPE positions)
    doc_index      (N,)       which document; train and eval are split by document
    topk_logprobs  (N, S, k)  only for soft labels: the trunk's k largest next-token log-probabilities
    topk_indices   (N, S, k)  ... and their token ids

The trunk runs once over each document (up to `max_length` tokens) and windows are cut from its output,
so a window's hidden states carry the whole left context, as they do in generation. Shards are
`shard_{i:05d}.safetensors` plus `manifest.json`; each shard holds whole batches of documents, so a
collection stopped anywhere resumes at the next shard and reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMATS = ("auto", "text", "jsonl", "parquet", "self")
HIDDEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MIN_DOC_TOKENS = 3  # the first MTP target is two tokens ahead of a position


class WarmupError(ValueError):
    """Bad input to the warm start (file, format, setting); the message is one line for the CLI."""


@dataclass
class Document:
    ids: list[int]
    target_start: int = 0  # tokens before it are context only (a chat prompt)


# ---- corpora ---------------------------------------------------------------------------------------

def detect_format(path: str) -> str:
    """text / jsonl / parquet by extension; `self` for verl RL rows that hold prompts but no responses."""
    if path.endswith(".txt"):
        return "text"
    if path.endswith((".jsonl", ".json")):
        fmt = "jsonl"
    elif path.endswith(".parquet"):
        fmt = "parquet"
    else:
        raise WarmupError(f"{path}: cannot tell the format from the extension (.txt, .jsonl, .parquet); "
                          f"pass --format")
    first = next(_rows(path, fmt, limit=1), None)
    return "self" if first is not None and _is_prompt_only(first[1]) else fmt


def _is_prompt_only(row: dict) -> bool:
    return "prompt" in row and not any(k in row for k in ("response", "text", "input_ids", "messages",
                                                          "conversations"))


def _rows(path: str, fmt: str, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a non-parquet file
            raise WarmupError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        rows = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
        yield from enumerate(rows)
        return
    for i, line in enumerate(_text_lines(path)):
        if limit is not None and i >= limit:
            return
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WarmupError(f"{path}: line {i + 1}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise WarmupError(f"{path}: line {i + 1}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _text_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        raise WarmupError(f"{path}: not UTF-8 text (byte {e.start}); a parquet file needs --format parquet") from None


def read_corpus(path: str, fmt: str, tokenizer, max_docs: int | None = None,
                prompt_key: str = "prompt") -> list[Document]:
    """Documents of a text (one per non-blank line), JSONL or parquet corpus.

    A row is one of: {"input_ids": [...], "target_start"?: int}; {"text": str};
    {prompt_key: chat messages or str, "response": str}; {"messages": [{role, content}]};
    {"conversations": [{from, value}]} (ShareGPT, as EAGLE's training data).
    """
    if not os.path.isfile(path):
        raise WarmupError(f"{path}: no such file")
    docs = []
    if fmt == "text":
        _need_tokenizer(tokenizer, path)
        lines = [line.rstrip("\n") for line in _text_lines(path) if line.strip()][:max_docs]
        return [Document(tokenizer.encode(line, add_special_tokens=False)) for line in lines]
    for i, row in _rows(path, fmt):
        if max_docs is not None and len(docs) >= max_docs:
            break
        try:
            docs.append(_row_document(row, tokenizer, prompt_key))
        except WarmupError as e:
            raise WarmupError(f"{path}: row {i}: {e}") from None
    return docs


def _need_tokenizer(tokenizer, what: str) -> None:
    if tokenizer is None:
        raise WarmupError(f"{what}: text needs a tokenizer (the model folder has none; pass --tokenizer)")


def _row_document(row: dict, tokenizer, prompt_key: str) -> Document:
    from verl_mtp.data.tokenizer import encode_chat, encode_response

    if "input_ids" in row:
        return Document([int(t) for t in row["input_ids"]], int(row.get("target_start") or 0))
    _need_tokenizer(tokenizer, "corpus")
    if isinstance(row.get("text"), str):
        return Document(tokenizer.encode(row["text"], add_special_tokens=False))
    if prompt_key in row and isinstance(row.get("response"), str):
        prompt = row[prompt_key]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        head = encode_chat(tokenizer, messages)
        return Document(head + encode_response(tokenizer, row["response"]), len(head))
    messages = row.get("messages") or _sharegpt(row.get("conversations"))
    if messages:
        first_reply = next((j for j, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        head = encode_chat(tokenizer, messages[:first_reply]) if first_reply else []
        return Document(encode_chat(tokenizer, messages, add_generation_prompt=False), len(head))
    if prompt_key in row:
        raise WarmupError(f"'{prompt_key}' without 'response': prompts only (use --format self to have the "
                          f"model answer them)")
    raise WarmupError(f"no usable field (expected input_ids, text, {prompt_key}+response, messages or "
                      f"conversations; got {sorted(row)})")


def _sharegpt(conversations) -> list[dict] | None:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    if not conversations:
        return None
    return [{"role": roles.get(turn.get("from"), "user"), "content": turn.get("value", "")} for turn in conversations]


def read_prompts(path: str, tokenizer, prompt_key: str = "prompt", max_docs: int | None = None) -> list[list[int]]:
    """Chat-template token ids of the prompts of a verl RL parquet/JSONL file (bad rows skipped)."""
    from verl_mtp.data.rl_dataset import RLDataset

    _need_tokenizer(tokenizer, path)
    try:
        dataset = RLDataset(path, tokenizer, prompt_key=prompt_key, filter_invalid=True)
    except ValueError as e:
        raise WarmupError(str(e).splitlines()[0]) from None
    return [dataset[i]["input_ids"] for i in range(len(dataset))][:max_docs]


def self_generate(model, prompts: Sequence[list[int]], eos_ids: Sequence[int], temperature: float,
                  max_new_tokens: int, seed: int, batch_size: int = 64) -> list[Document]:
    """The model answers its RL prompts (plain decoding: the MTP layers are not trusted yet), so the warm
    start sees the distribution rollouts will see. Targets are the response tokens; an answer ends at its
    first stop token. Batch 64 by default: a small model's CPU decode step is mostly reading the weights, so a
    wider batch gives more tokens per second."""
    from verl_mtp.rollout import NativeEngine, SamplingParams

    longest = max(len(p) for p in prompts)
    engine = NativeEngine(model, max_batch_size=min(batch_size, len(prompts)), max_seq_len=longest + max_new_tokens)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_token_ids=list(eos_ids),
                            seed=seed)
    out = engine.generate([list(p) for p in prompts], params, speculative=0)
    return [Document(list(prompts[s.prompt_index]) + s.token_ids, len(prompts[s.prompt_index])) for s in out.samples]


def write_documents(path: Path, docs: Sequence[Document]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"input_ids": d.ids, "target_start": d.target_start}) + "\n")
    os.replace(tmp, path)


def prepare_documents(items: Sequence, tokenizer=None) -> list[Document]:
    """str / token list / Document -> Documents with at least MIN_DOC_TOKENS tokens."""
    docs = []
    for item in items:
        if isinstance(item, Document):
            doc = item
        elif isinstance(item, str):
            _need_tokenizer(tokenizer, "corpus")
            doc = Document(tokenizer.encode(item, add_special_tokens=False))
        else:
            doc = Document([int(t) for t in item])
        if len(doc.ids) >= MIN_DOC_TOKENS:
            docs.append(doc)
    if len(docs) < 2:
        raise WarmupError(f"corpus: {len(docs)} documents with >= {MIN_DOC_TOKENS} tokens; need at least 2 "
                          f"(one to train on, one held out)")
    return docs


def corpus_digest(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.target_start}:{len(d.ids)}:".encode())
        h.update(torch.tensor(d.ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def trunk_fingerprint(model) -> str:
    """sha256 over the trunk's names, shapes and 1024 evenly spaced values per tensor: tells two trunks
    apart without hashing billions of parameters (a fingerprint, not a checksum)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".mtp_layers." in name:
            continue
        flat = t.detach().reshape(-1)
        # integer spacing: a float32 linspace over a 49k x 576 embedding rounds its last index past the end
        m = min(flat.numel(), 1024)
        idx = torch.arange(m, device=flat.device) * (flat.numel() - 1) // max(m - 1, 1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- trunk features and windows --------------------------------------------------------------------

def window_starts(n: int, size: int, stride: int) -> list[int]:
    """Starts of `size`-token windows every `stride` tokens; the last window ends at the document's end."""
    if n <= size:
        return [0]
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


@torch.no_grad()
def trunk_features(model, token_lists: Sequence[Sequence[int]], topk: int) -> dict[str, torch.Tensor]:
    """One frozen-trunk pass over right-padded documents: hidden states, greedy next tokens, top-k (CPU)."""
    device = model.lm_head.weight.device
    width = max(len(t) for t in token_lists)
    ids = torch.zeros(len(token_lists), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    was_training = model.training
    out = model.eval()(ids.to(device), attention_mask=mask.to(device), num_mtp=0)
    model.train(was_training)
    feats = {"hidden_states": out.hidden_states.cpu(), "next_tokens": out.logits.argmax(-1).cpu()}
    if topk:
        top = out.logits.float().log_softmax(-1).topk(topk, dim=-1)
        feats["topk_logprobs"], feats["topk_indices"] = top.values.cpu(), top.indices.to(torch.int32).cpu()
    return feats


def cut_window(doc: Document, doc_index: int, feats: dict[str, torch.Tensor], row: int, start: int, size: int,
               hidden_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One sample: the window [start, start + size) of row `row` of `trunk_features`, right-padded."""
    n = min(size, len(doc.ids) - start)
    positions = torch.arange(start, start + n)
    sample = {
        "input_ids": torch.tensor(doc.ids[start:start + n], dtype=torch.long),
        "loss_mask": (positions >= doc.target_start).to(torch.uint8),
        "lengths": torch.tensor(n, dtype=torch.long),
        "offsets": torch.tensor(start, dtype=torch.long),
        "doc_index": torch.tensor(doc_index, dtype=torch.long),
    }
    for key, t in feats.items():
        sample[key] = t[row, start:start + n]
    if hidden_dtype is not None:
        sample["hidden_states"] = sample["hidden_states"].to(hidden_dtype)
        if "topk_logprobs" in sample:
            sample["topk_logprobs"] = sample["topk_logprobs"].to(hidden_dtype)
    for key, t in sample.items():
        if t.dim() and n < size:
            sample[key] = torch.cat([t, t.new_zeros((size - n, *t.shape[1:]))])
    return sample


def stack(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# ---- collection to shards, with resume -------------------------------------------------------------

@dataclass
class CollectSettings:
    """Everything that decides the bytes of the shards; a resumed collection must match it exactly."""

    trunk: str  # trunk_fingerprint
    corpus: str  # corpus_digest
    num_docs: int
    sample_size: int
    stride: int
    max_samples: int | None
    max_length: int
    hidden_dtype: str
    topk: int
    shard_size: int
    docs_per_batch: int


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WarmupError(f"{path}: unreadable manifest ({e.msg})") from None


def _start_manifest(folder: Path, settings: CollectSettings, model) -> dict:
    manifest = read_manifest(folder)
    wanted = asdict(settings)
    if manifest is None:
        return {"format_version": 1, "settings": wanted, "hidden_size": model.config.hidden_size,
                "vocab_size": model.config.vocab_size, "shards": [], "num_samples": 0, "next_doc": 0,
                "complete": False}
    for key, value in wanted.items():
        if manifest["settings"].get(key) != value:
            raise WarmupError(f"{folder}: collected with {key}={manifest['settings'].get(key)!r}, now {value!r}; "
                              f"use another data folder or delete this one")
    for shard in manifest["shards"]:
        if not (folder / shard["file"]).is_file():
            raise WarmupError(f"{folder}: manifest lists {shard['file']} but the file is missing")
    return manifest


def write_shard(path: Path, samples: Sequence[dict[str, torch.Tensor]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in stack(samples).items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def collect(model, docs: Sequence[Document], folder: Path, settings: CollectSettings,
            log: Callable[[str], None] = print) -> dict:
    """Stream the trunk's features of `docs` into shards under `folder`; resume a stopped collection.

    Documents go through the trunk `docs_per_batch` at a time and a shard is flushed only between
    batches, so the batches after a resume are the batches the uninterrupted run would have seen.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(folder, settings, model)
    if manifest["complete"]:
        log(f"collection: {folder} is complete ({manifest['num_samples']} samples), reusing it")
        return manifest
    if manifest["shards"]:
        log(f"collection: resuming at document {manifest['next_doc']} ({manifest['num_samples']} samples so far)")
    dtype = HIDDEN_DTYPES[settings.hidden_dtype]
    buffer, count = [], manifest["num_samples"]
    limit = settings.max_samples if settings.max_samples is not None else float("inf")
    start = manifest["next_doc"]
    while start < len(docs) and count < limit:
        batch = [Document(d.ids[: settings.max_length], d.target_start)
                 for d in docs[start:start + settings.docs_per_batch]]
        feats = trunk_features(model, [d.ids for d in batch], settings.topk)
        for row, doc in enumerate(batch):
            for s in window_starts(len(doc.ids), settings.sample_size, settings.stride):
                if count < limit:
                    buffer.append(cut_window(doc, start + row, feats, row, s, settings.sample_size, dtype))
                    count += 1
        start += len(batch)
        if len(buffer) >= settings.shard_size or start >= len(docs) or count >= limit:
            _flush(folder, manifest, buffer, start)
            log(f"collection: {manifest['shards'][-1]['file']} ({len(buffer)} samples, "
                f"{start}/{len(docs)} documents)")
            buffer = []
    manifest["complete"] = True
    _atomic_json(folder / MANIFEST, manifest)
    return manifest


def _flush(folder: Path, manifest: dict, samples: list, next_doc: int) -> None:
    if samples:
        name = f"shard_{len(manifest['shards']):05d}.safetensors"
        write_shard(folder / name, samples)  # the shard lands before the manifest names it
        manifest["shards"].append({"file": name, "num_samples": len(samples), "next_doc": next_doc})
        manifest["num_samples"] += len(samples)
    manifest["next_doc"] = next_doc
    _atomic_json(folder / MANIFEST, manifest)


# ---- sample sources: shards on disk, or the trunk on the fly ----------------------------------------

def is_eval_doc(doc_index: torch.Tensor | int, eval_every: int):
    """Every `eval_every`-th document is held out: its windows are evaluated, its prompts drive the
    accept-length measurement, and none of it is trained on."""
    return doc_index % eval_every == eval_every - 1


def _rebatch(chunks: Iterator[dict[str, torch.Tensor]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Regroup a stream of row-chunks into batches of exactly `batch_size` rows (the last may be short)."""
    pending: list[dict[str, torch.Tensor]] = []
    rows = 0
    for chunk in chunks:
        pending.append(chunk)
        rows += len(chunk["input_ids"])
        while rows >= batch_size:
            merged = {k: torch.cat([c[k] for c in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            pending, rows = [rest], rows - batch_size
    if rows:
        yield {k: torch.cat([c[k] for c in pending]) for k in pending[0]}


class ShardSource:
    """Batches read from a finished collection; one shard in memory at a time."""

    def __init__(self, folder: Path, eval_every: int):
        manifest = read_manifest(folder)
        if manifest is None:
            raise WarmupError(f"{folder}: no {MANIFEST} (not a collection folder)")
        if not manifest["complete"]:
            raise WarmupError(f"{folder}: the collection is incomplete; rerun the collection to finish it")
        self.folder, self.manifest, self.eval_every = folder, manifest, eval_every
        self.settings = manifest["settings"]
        self.topk = self.settings["topk"]
        self._docs = {}
        for shard in manifest["shards"]:
            with safe_open(str(folder / shard["file"]), framework="pt") as f:
                self._docs[shard["file"]] = f.get_tensor("doc_index")

    def num_samples(self, split: str) -> int:
        return sum(int(self._select(d, split).sum()) for d in self._docs.values())

    def _select(self, doc_index: torch.Tensor, split: str) -> torch.Tensor:
        held = is_eval_doc(doc_index, self.eval_every)
        return held if split == "eval" else ~held

    def batches(self, split: str, batch_size: int, shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        files = list(self._docs)
        order = torch.randperm(len(files), generator=g).tolist() if shuffle else range(len(files))

        def chunks():
            for i in order:
                data = load_file(str(self.folder / files[i]))
                rows = self._select(data["doc_index"], split).nonzero().squeeze(-1)
                if shuffle:
                    rows = rows[torch.randperm(len(rows), generator=g)]
                if len(rows):
                    yield {k: v[rows] for k, v in data.items()}

        return _rebatch(chunks(), batch_size)

    def eval_documents(self) -> list[Document]:
        """The held-out documents' first windows, as documents (for accept-length prompts)."""
        docs = []
        for name, doc_index in self._docs.items():
            if not is_eval_doc(doc_index, self.eval_every).any():
                continue
            data = load_file(str(self.folder / name))
            for r in (is_eval_doc(doc_index, self.eval_every) & (data["offsets"] == 0)).nonzero().squeeze(-1).tolist():
                ids = data["input_ids"][r, : int(data["lengths"][r])].tolist()
                targets = data["loss_mask"][r, : len(ids)].nonzero()
                docs.append(Document(ids, int(targets[0]) if len(targets) else len(ids)))
        return docs


class OnTheFlySource:
    """The same samples as a collection, computed by the frozen trunk for every batch (no disk).

    A window's features come from a trunk pass over its document's prefix up to the window's end, which
    a causal trunk makes equal to cutting it from a pass over the whole document.
    """

    def __init__(self, model, docs: Sequence[Document], eval_every: int, sample_size: int, stride: int,
                 max_samples: int | None, max_length: int, topk: int):
        self.model, self.eval_every, self.sample_size, self.topk = model, eval_every, sample_size, topk
        self.docs = [Document(d.ids[:max_length], d.target_start) for d in docs]
        self.windows = [(i, s) for i, d in enumerate(self.docs)
                        for s in window_starts(len(d.ids), sample_size, stride)][:max_samples]

    def _split(self, split: str) -> list[tuple[int, int]]:
        return [w for w in self.windows if bool(is_eval_doc(w[0], self.eval_every)) == (split == "eval")]

    def num_samples(self, split: str) -> int:
        return len(self._split(split))

    def batches(self, split: str, batch_size: int, shuffle: bool, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        windows = self._split(split)
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            windows = [windows[i] for i in torch.randperm(len(windows), generator=g).tolist()]
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            docs = [self.docs[i] for i, _ in chunk]
            prefixes = [d.ids[: s + self.sample_size] for d, (_, s) in zip(docs, chunk)]
            feats = trunk_features(self.model, prefixes, self.topk)
            yield stack([cut_window(d, i, feats, row, s, self.sample_size)
                         for row, (d, (i, s)) in enumerate(zip(docs, chunk))])

    def eval_documents(self) -> list[Document]:
        return [d for i, d in enumerate(self.docs) if is_eval_doc(i, self.eval_every)]
