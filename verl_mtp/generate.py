"""Generate with an MTP model: one prompt, a file of prompts, or an interactive chat.

    verl-mtp generate checkpoints/sft --prompt "What is 17 + 5?"
    verl-mtp generate checkpoints/sft --prompts-file questions.txt > answers.jsonl
    verl-mtp generate checkpoints/sft                 # chat, when stdin is a terminal (or --chat)

Prompts go through the tokenizer's chat template (`--raw`: plain text continuation). A prompts file
holds one prompt per line, or, as .jsonl, one JSON string or {"prompt": text or chat messages} per
line; all of it is batched through the engine and printed as JSONL. A single prompt and chat replies
stream as they are produced; in chat, `clear` resets the history and `exit` (or Ctrl-D) quits.

Decoding is greedy at --temperature 0 (the default), else sampled with --top-k/--top-p. When the
model has MTP layers the engine drafts with them (`--speculative auto|0|N`) and the measured accept
length (tokens per target forward) is printed at the end. Speculation is lossless only when the
target p and the draft q are warped identically; --repetition-penalty, --presence-penalty,
--frequency-penalty and --no-repeat-ngram reshape p from the text generated so far, which the drafts do
not see, so with any of them on the engine decodes plainly (they are SamplingParams options of the
engine, applied to the generated tokens only).

Everything decodes through the rollout engine (NativeEngine); streaming uses its `on_tokens` callback:
text is written as drafts are accepted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from verl_mtp.cli import OneLineParser
from verl_mtp.models import MTPCausalLM
from verl_mtp.rollout.engine import NativeEngine, SpecStats
from verl_mtp.rollout.sampling import SamplingParams


class GenerateError(ValueError):
    """Bad options, prompts or model folders: reported as one line."""


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"


# ---- incremental detokenization --------------------------------------------------------------


class TextStream:
    """Writes the text of a growing token list as it grows. Byte-level BPE can split one character over
    several tokens, so while the decoded text ends in an incomplete character (U+FFFD) it is held back."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            self.write(text[self.sent:])
            self.sent = len(text)


# ---- the generator ---------------------------------------------------------------------------


class Generator:
    """Model + tokenizer + decoding settings; batched or streamed completions, accept-length bookkeeping.

    speculative: "auto" or a draft depth; forced to 0 when the model has no MTP layers or a penalty of
    `params` is on (see the module docstring). `speculation_note` says why it is off, if it is.
    """

    def __init__(self, model: MTPCausalLM, tokenizer, params: SamplingParams, speculative: int | str = "auto",
                 max_batch_size: int = 1, max_seq_len: int = 2048):
        self.model, self.tokenizer, self.params = model.eval(), tokenizer, params
        self.max_seq_len = max_seq_len
        self.speculation_note = None
        if params.penalized:
            self.speculation_note = "penalties active, plain decoding"
        elif model.num_mtp_layers == 0:
            self.speculation_note = "the model has no MTP layers"
        elif speculative == 0:
            self.speculation_note = "--speculative 0"
        self.depth = 0 if self.speculation_note else speculative
        self._engine_args = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self._engine: NativeEngine | None = None
        self._seeds = random.Random(params.seed)  # one seed per engine call: reproducible with --seed
        self.stats = SpecStats()
        self.tokens, self.seconds = 0, 0.0

    @property
    def engine(self) -> NativeEngine:
        if self._engine is None:
            engine = NativeEngine(self.model, self.tokenizer, speculative=self.depth, **self._engine_args)
            if isinstance(self.depth, int) and self.depth > engine.max_draft_depth:
                raise GenerateError(f"--speculative {self.depth} exceeds the engine's max draft depth "
                                    f"{engine.max_draft_depth} ({self.model.num_mtp_layers} MTP layers + 4)")
            self._engine = engine
        return self._engine

    def check_length(self, prompt: list[int], what: str = "prompt") -> None:
        if len(prompt) + self.params.max_new_tokens > self.max_seq_len:
            raise GenerateError(f"{what} is {len(prompt)} tokens; with --max-new-tokens {self.params.max_new_tokens} "
                                f"it exceeds --max-seq-len {self.max_seq_len}")

    def generate(self, prompts: list[list[int]]) -> list[Completion]:
        """Complete every prompt in one engine call (continuous batching)."""
        for i, p in enumerate(prompts):
            self.check_length(p, f"prompt {i}")
        started = time.perf_counter()
        out = self.engine.generate(prompts, replace(self.params, seed=self._seeds.randrange(2**63)))
        self.stats.merge(out.stats)
        results = [(s.token_ids, s.finish_reason) for s in out.samples]
        self._account(sum(len(t) for t, _ in results), started)
        return [self._completion(tokens, reason) for tokens, reason in results]

    def stream(self, prompt: list[int], write: Callable[[str], None]) -> Completion:
        """Complete one prompt, writing its text as it is produced."""
        self.check_length(prompt)
        started = time.perf_counter()
        text = TextStream(self.tokenizer, write)
        tokens, reason = self._stream_engine(prompt, text)
        text.finish()
        self._account(len(tokens), started)
        return self._completion(tokens, reason)

    def _stream_engine(self, prompt: list[int], text: TextStream) -> tuple[list[int], str]:
        params = replace(self.params, seed=self._seeds.randrange(2**63))
        out = self.engine.generate([prompt], params, on_tokens=lambda _, ids: text.push(ids))
        self.stats.merge(out.stats)
        [sample] = out.samples
        return sample.token_ids, sample.finish_reason

    def _completion(self, tokens: list[int], reason: str) -> Completion:
        return Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), reason)

    def _account(self, tokens: int, started: float) -> None:
        self.tokens += tokens
        self.seconds += time.perf_counter() - started

    def summary(self) -> str:
        """`accept length 2.31 (speculative depth auto); 120 tokens, 85 tok/s`, or why speculation was off."""
        rate = f"{self.tokens} tokens, {self.tokens / max(self.seconds, 1e-9):.0f} tok/s"
        if self.speculation_note:
            return f"speculative decoding off ({self.speculation_note}); {rate}"
        return f"accept length {self.stats.accept_length:.2f} (speculative depth {self.depth}); {rate}"


# ---- prompts ---------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str | list[dict], system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of a prompt: chat-templated (a string is one user message), or the plain text if `raw`."""
    from verl_mtp.data.tokenizer import encode_chat

    if raw:
        if not isinstance(prompt, str):
            raise GenerateError("--raw needs text prompts, not chat messages")
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return encode_chat(tokenizer, messages)


def read_prompts(path: str, stdin=None) -> list[str | list[dict]]:
    """Prompts of a file (`-`: stdin): JSONL (.jsonl) of strings or {"prompt": text or messages} objects,
    otherwise one prompt per non-empty line."""
    lines = (stdin or sys.stdin).read().splitlines() if path == "-" else _read_lines(path)
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    prompts = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            prompts.append(_jsonl_prompt(line, f"{path} line {lineno}"))
    return prompts


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise GenerateError(f"--prompts-file {path}: {e.strerror}") from None


def _jsonl_prompt(line: str, where: str) -> str | list[dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise GenerateError(f"{where}: not valid JSON ({e.msg})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else row
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        return prompt
    raise GenerateError(f"{where}: field 'prompt' must be a non-empty string or a list of "
                        f"{{'role', 'content'}} messages (or the line a JSON string)")


def _is_message(m: object) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


# ---- modes -----------------------------------------------------------------------------------


def run_prompts(generator: Generator, prompts: list, ids: list[list[int]], out=None, per_call: int = 256) -> None:
    """Prompts through the engine, `per_call` at a time (it batches them itself, refilling slots as
    sequences finish); one JSON line per prompt, in order, written as each call returns."""
    out = out or sys.stdout
    for start in range(0, len(ids), per_call):
        completions = generator.generate(ids[start:start + per_call])
        for prompt, completion in zip(prompts[start:start + per_call], completions):
            out.write(json.dumps({"prompt": prompt, "response": completion.text,
                                  "finish_reason": completion.finish_reason, "tokens": len(completion.token_ids)},
                                 ensure_ascii=False) + "\n")
        out.flush()


def chat_loop(generator: Generator, system: str | None = None, read: Callable[[str], str] = input,
              out=None) -> None:
    """Interactive chat: each reply streams; the history is re-sent every turn (the oldest turns are
    dropped when it no longer fits). `clear` resets it; `exit`, `quit` or end of input quits."""
    out = out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write("chat: 'clear' resets the history, 'exit' quits\n")
    history: list[dict] = []
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        command = line.strip()
        if not command:
            continue
        if command in ("exit", "quit"):
            return
        if command == "clear":
            history = []
            write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        prompt = _fit_history(generator, history, system)
        if prompt is None:
            history.pop()
            write("(message too long for --max-seq-len; not sent)\n")
            continue
        write("assistant> ")
        try:
            reply = generator.stream(prompt, write)
        except KeyboardInterrupt:
            history.pop()
            write("\n(interrupted)\n")
            continue
        write("\n")
        history.append({"role": "assistant", "content": reply.text})


def _fit_history(generator: Generator, history: list[dict], system: str | None) -> list[int] | None:
    """Prompt ids of the history, dropping the oldest turns (in place) until it fits; None if even the
    last message alone does not."""
    while True:
        prompt = encode_prompt(generator.tokenizer, history, system)
        if len(prompt) + generator.params.max_new_tokens <= generator.max_seq_len:
            return prompt
        if len(history) <= 1:
            return None
        del history[:2]  # a user message and the reply to it


# ---- command line ----------------------------------------------------------------------------


def _speculative(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"must be 'auto' or a draft depth >= 0, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="verl-mtp generate", description=__doc__.splitlines()[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model", help="HF/MiMo model folder (with its tokenizer, or give --tokenizer)")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="one prompt; its reply streams to stdout")
    source.add_argument("--prompts-file", help="one prompt per line, or .jsonl; '-' reads stdin; JSONL out")
    source.add_argument("--chat", action="store_true", help="interactive chat (the default on a terminal)")
    ap.add_argument("--system", help="system message for chat-templated prompts")
    ap.add_argument("--raw", action="store_true", help="plain text continuation, no chat template")
    ap.add_argument("--tokenizer", help="HF tokenizer folder (omitted: the model folder)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=-1, help="<= 0: off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    ap.add_argument("--seed", type=int, help="makes sampling reproducible, with a fixed --speculative (auto "
                    "picks depths by measured speed, and the depth changes which random numbers are drawn)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens "
                    "(turns speculation off)")
    ap.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted from the logit of every "
                    "token generated so far (turns speculation off)")
    ap.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per occurrence of a "
                    "generated token (turns speculation off)")
    ap.add_argument("--no-repeat-ngram", type=int, default=0, help="forbid repeating any n-gram of this size "
                    "(0: off; turns speculation off)")
    ap.add_argument("--speculative", type=_speculative, default="auto",
                    help="MTP draft depth: auto (chosen per round), 0 (off) or N")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences decoded together (--prompts-file)")
    ap.add_argument("--max-seq-len", type=int, help="prompt + reply tokens (omitted: what the prompts need; "
                    "in chat, the model's context up to 4096)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return ap


def _check(args) -> None:
    rules = [("max_new_tokens", args.max_new_tokens >= 1, "must be >= 1"),
             ("temperature", args.temperature >= 0, "must be >= 0"),
             ("top_p", 0 < args.top_p <= 1, "must be in (0, 1]"),
             ("repetition_penalty", args.repetition_penalty > 0, "must be > 0"),
             ("no_repeat_ngram", args.no_repeat_ngram >= 0, "must be >= 0"),
             ("batch_size", args.batch_size >= 1, "must be >= 1"),
             ("threads", args.threads >= 1, "must be >= 1"),
             ("max_seq_len", args.max_seq_len is None or args.max_seq_len >= 2, "must be >= 2")]
    for name, ok, requirement in rules:
        if not ok:
            raise GenerateError(f"--{name.replace('_', '-')} {requirement} (got {getattr(args, name)!r})")


def load(model_dir: str, tokenizer_dir: str | None, device: str):
    from verl_mtp.models import CheckpointError
    from verl_mtp.trainer.setup import load_tokenizer, resolve_device

    try:
        model = MTPCausalLM.from_pretrained(model_dir, device=resolve_device(device))
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    try:
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    except (OSError, ValueError) as e:
        raise GenerateError(f"{tokenizer_dir or model_dir}: no usable tokenizer ({str(e).splitlines()[0]}); "
                            f"give --tokenizer") from None
    if len(tokenizer) > model.config.vocab_size:
        raise GenerateError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                            f"{model.config.vocab_size}")
    return model, tokenizer


def stop_token_ids(model: MTPCausalLM, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def main(argv: list[str] | None = None, stdin=None) -> int:
    args = build_parser().parse_args(argv)
    stdin = stdin or sys.stdin
    try:
        return _run(args, stdin)
    except GenerateError as e:
        raise SystemExit(f"verl-mtp generate: error: {e}") from None


def _run(args, stdin) -> int:
    _check(args)
    chat = args.chat or (args.prompt is None and args.prompts_file is None)
    if chat and not args.chat and not stdin.isatty():
        raise GenerateError("no prompt: give --prompt, --prompts-file (- for stdin) or --chat")
    if chat and args.raw:
        raise GenerateError("--raw has no chat; give --prompt or --prompts-file")
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, args.tokenizer, args.device)
    if not args.raw and not getattr(tokenizer, "chat_template", None):
        raise GenerateError("the tokenizer has no chat template; use --raw for plain text continuation")
    if args.speculative not in ("auto", 0) and model.num_mtp_layers == 0:
        raise GenerateError(f"--speculative {args.speculative} needs MTP layers; the model has none")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, stop_token_ids=stop_token_ids(model, tokenizer),
                            seed=args.seed, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            no_repeat_ngram_size=args.no_repeat_ngram)
    if params.penalized and model.num_mtp_layers and args.speculative != 0:
        _say("speculative decoding is off: the penalties reshape each step's distribution from the generated "
             "text, and MTP drafts stay lossless only when draft and target are processed identically")

    prompts = [args.prompt] if args.prompt is not None else None
    if args.prompts_file is not None:
        prompts = read_prompts(args.prompts_file, stdin)
        if not prompts:
            raise GenerateError(f"--prompts-file {args.prompts_file}: no prompts")
    ids = [encode_prompt(tokenizer, p, args.system, args.raw) for p in prompts or []]
    # the KV cache is sized for this: what the prompts need, or in chat the model's context
    max_seq_len = args.max_seq_len or (max(map(len, ids)) + args.max_new_tokens if ids
                                       else min(model.config.max_position_embeddings, 4096))
    generator = Generator(model, tokenizer, params, args.speculative,
                          max_batch_size=args.batch_size if args.prompts_file is not None else 1,
                          max_seq_len=max_seq_len)
    if args.prompts_file is not None:
        run_prompts(generator, prompts, ids)
    elif args.prompt is not None:
        generator.stream(ids[0], _write_stdout)
        _write_stdout("\n")
    else:
        chat_loop(generator, args.system, read=_reader(stdin))
    _say(generator.summary())
    return 0


def _reader(stdin) -> Callable[[str], str]:
    """`input` (line editing on a terminal) when reading the real stdin, else lines of `stdin`."""
    if stdin is sys.stdin:
        return input

    def read(prompt: str) -> str:
        _write_stdout(prompt)
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _say(message: str) -> None:
    print(f"verl-mtp generate: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
