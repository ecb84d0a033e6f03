"""The engine against llama.cpp on the same GGUF file: next-token logits over a prompt.

Runs only where `llama-cpp-python` is installed (it compiles llama.cpp; CI does not install it).
llama.cpp rounds the activations to 8 bits for quantized products, the engine does not, so quantized
files agree within that rounding: far closer to each other than to the float file they came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
import test_gguf  # noqa: E402
from test_gguf import Q, write_gguf  # noqa: E402

from engine.model.loader import load_model  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128]


@pytest.fixture(autouse=True)
def _full_vocab(monkeypatch):
    """llama.cpp takes the vocabulary size from the token list: pad it to the embedding's rows."""
    real = test_gguf._tokenizer_kv

    def padded(writer, folder):
        n = json.loads((folder / "config.json").read_text())["vocab_size"]
        add_list, add_types = writer.add_token_list, writer.add_token_types
        writer.add_token_list = lambda t: add_list([*t, *(f"<unused{i}>" for i in range(len(t), n))])
        writer.add_token_types = lambda t: add_types([*t, *([3] * (n - len(t)))])
        real(writer, folder)

    monkeypatch.setattr(test_gguf, "_tokenizer_kv", padded)


def llama_logits(file) -> np.ndarray:
    llm = llama_cpp.Llama(str(file), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    llm.eval(PROMPT)
    return np.array(llm.scores[:len(PROMPT)])


def engine_logits(file) -> np.ndarray:
    loaded = load_model(file, device="cpu", profile=None, budget=0, dense="source")  # as the file: dense F32
    with torch.no_grad():
        return loaded.model(torch.tensor([PROMPT])).logits[0].float().numpy()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_f32_logits_agree_with_llama_cpp(arch, tiny_model_factory, tmp_path):
    file = write_gguf(tiny_model_factory(arch), tmp_path / "f32.gguf", Q.F32)
    ours, theirs = engine_logits(file), llama_logits(file)
    assert np.abs(ours - theirs).max() < 0.02 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=["Q8_0", "Q4_0"])
def test_quantized_experts_agree_with_llama_cpp(qtype, tiny_model_factory, tmp_path):
    folder = tiny_model_factory("mixtral")
    floats = engine_logits(write_gguf(folder, tmp_path / "f32.gguf", Q.F32))
    file = write_gguf(folder, tmp_path / "q.gguf", Q.F32, experts_qtype=qtype)
    ours, theirs = engine_logits(file), llama_logits(file)
    assert np.abs(ours - theirs).max() < np.abs(ours - floats).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
