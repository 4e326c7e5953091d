"""What an ``ActivationSubspace`` protects: the module kinds (Linear, Conv1D, PEFT LoRA Linear, Embedding;
normalisation layers), the protected modules and frozen parameters of a model, the weights each module's
projection touches, and, while observing, the discovery of modules that read one shared input tensor."""
from __future__ import annotations

import sys
import weakref
from typing import Iterable

import torch
from torch import nn

from .inputs import DistinctInput, ProtectedModule

__all__ = ["module_kind", "lora_kind", "is_norm", "find_protected", "find_frozen", "projected_weights",
           "check_no_shared_weights", "input_key", "joins_counted_input", "record_reader", "check_pending"]

#: (input tensor's identity) -> (a weak reference to it, the input it was counted into), for one forward.
SeenInputs = dict[tuple, tuple[weakref.ref, DistinctInput]]


def is_conv1d(m: nn.Module) -> bool:
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls is not None and isinstance(m, cls)


def lora_kind(m: nn.Module) -> str | None:
    """'linear' for a PEFT LoRA Linear, 'unsupported' for other LoRA layers, None otherwise."""
    mod = sys.modules.get("peft.tuners.lora.layer")
    base = getattr(mod, "LoraLayer", None) if mod is not None else None
    if base is None or not isinstance(m, base):
        return None
    a = getattr(m, "lora_A", None)
    if isinstance(a, nn.ModuleDict) and len(a) and all(isinstance(v, nn.Linear) for v in a.values()) \
            and not any(bool(v) for v in getattr(m, "use_dora", {}).values()):
        return "linear"
    return "unsupported"


def is_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or name.endswith("Norm") or "RMSNorm" in name


def module_kind(m: nn.Module) -> str | None:
    """'lora', 'unsupported-lora', 'linear', 'conv1d', 'embedding', or None for a module not protected."""
    lk = lora_kind(m)
    if lk == "linear":
        return "lora"
    if lk == "unsupported":
        return "unsupported-lora"
    if isinstance(m, nn.Linear):
        return "linear"
    if is_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.Embedding):
        return "embedding"
    return None


def find_protected(model: nn.Module, modules: Iterable[nn.Module | str] | None) -> list[ProtectedModule]:
    """The modules given (checked), or with ``modules=None`` every supported module with a trainable weight."""
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    entries: list[ProtectedModule] = []
    if modules is not None:
        if isinstance(modules, (nn.Module, str)):
            modules = [modules]
        chosen = list(modules)
        if not chosen:
            raise ValueError("modules is empty: give at least one module to protect (or None for all)")
        seen: set[str] = set()
        for i, m in enumerate(chosen):
            if isinstance(m, str):
                if m not in named:
                    raise ValueError(f"modules[{i}] = {m!r} is not a module name of the model")
                name, mod = m, named[m]
            elif isinstance(m, nn.Module):
                if id(m) not in by_id:
                    raise ValueError(f"modules[{i}] ({type(m).__name__}) is not a submodule of the model")
                name, mod = by_id[id(m)], m
            else:
                raise TypeError(f"modules[{i}] is a {type(m).__name__}; expected an nn.Module or a module name")
            kind = module_kind(mod)
            if kind is None or kind == "unsupported-lora":
                raise TypeError(
                    f"modules[{i}] ({name!r}, {type(mod).__name__}) is not supported: ActivationSubspace "
                    f"protects nn.Linear, transformers Conv1D, nn.Embedding and PEFT LoRA Linear layers "
                    f"(not DoRA, LoRA embeddings or convolutions)"
                )
            if name in seen:
                raise ValueError(f"modules[{i}] ({name!r}) is given twice")
            seen.add(name)
            entries.append(ProtectedModule(name, mod, kind))
        return entries
    lora_children: set[int] = set()
    for name, m in named.items():
        if module_kind(m) in ("lora", "unsupported-lora"):
            for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                sub = getattr(m, attr, None)
                if isinstance(sub, nn.Module):
                    lora_children.update(id(c) for c in sub.modules())
    for name, m in named.items():
        if id(m) in lora_children:
            continue
        kind = module_kind(m)
        if kind == "unsupported-lora":
            raise TypeError(
                f"{name!r} ({type(m).__name__}) is a LoRA layer ActivationSubspace does not support (DoRA, "
                f"LoRA embedding or convolution); pass modules= to protect the others"
            )
        if kind is None:
            continue
        if kind == "lora":
            trainable = any(v.weight.requires_grad for v in m.lora_A.values()) or \
                any(v.weight.requires_grad for v in m.lora_B.values())
        else:
            trainable = m.weight.requires_grad
        if trainable:
            entries.append(ProtectedModule(name, m, kind))
    if not entries:
        raise ValueError("the model has no trainable nn.Linear, Conv1D, nn.Embedding or LoRA layer to protect")
    return entries


def find_frozen(model: nn.Module, entries: list[ProtectedModule], *, energy: float, biases: str,
                norms: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the biases and normalisation weights whose updates are zeroed."""
    out: list[tuple[str, nn.Parameter]] = []
    if energy == 0:  # energy 0 protects nothing: nothing frozen either (the step is the plain one)
        return out
    if biases == "freeze":
        for e in entries:
            b = getattr(e.module, "bias", None)
            if e.kind in ("linear", "conv1d") and isinstance(b, nn.Parameter):
                out.append((e.name + ".bias", b))
    if norms == "freeze":
        for name, m in model.named_modules():
            if is_norm(m):
                for pn, p in m.named_parameters(recurse=False):
                    out.append((f"{name}.{pn}", p))
    return out


def projected_weights(e: ProtectedModule, lora: str) -> list[tuple[str, nn.Parameter, str]]:
    """(label, parameter, role) of what the module projects: role 'dense', 'dense_t' (a Conv1D weight, stored
    [d_in, d_out]), 'lora_b:<adapter>' or 'rows' (an embedding's token rows)."""
    m = e.module
    if e.kind == "linear":
        return [(e.name + ".weight", m.weight, "dense")]
    if e.kind == "conv1d":
        return [(e.name + ".weight", m.weight, "dense_t")]
    if e.kind == "embedding":
        return [(e.name + ".weight", m.weight, "rows")]
    out = []
    for a, lin in m.lora_A.items():
        out.append((f"{e.name}.lora_A.{a}.weight", lin.weight, "dense"))
    if lora == "both":  # with lora="input", A x = 0 on the span already: B needs no projection
        for a, lin in m.lora_B.items():
            out.append((f"{e.name}.lora_B.{a}.weight", lin.weight, "lora_b:" + a))
    return out


def check_no_shared_weights(entries: list[ProtectedModule], lora: str) -> None:
    owner: dict[int, str] = {}
    for e in entries:
        for label, p, role in projected_weights(e, lora):
            if role == "rows":
                continue  # row zeroing commutes with a column projection (tied embeddings are fine)
            if id(p) in owner:
                raise ValueError(
                    f"{label} is the same parameter as {owner[id(p)]}: two column projections of one weight "
                    f"do not compose into one; pass modules= to protect only one of them"
                )
            owner[id(p)] = label


# -- shared inputs, found while observing ---------------------------------------------------------------------
def input_key(x: torch.Tensor) -> tuple:
    """What identifies one live input tensor within a forward (its storage and layout)."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


def joins_counted_input(seen: SeenInputs, inputs: list[DistinctInput], e: ProtectedModule, key: tuple) -> bool:
    """At ``e``'s pre-hook: True when its input tensor was already counted in this forward (by a module of
    its own input, or, at first sight, by another module's, which ``e`` then joins: one basis for all), so
    ``e`` adds nothing. Raises when modules found to share an input stop sharing it."""
    g = e.group
    hit = seen.get(key)
    if hit is not None and hit[0]() is not None:
        owner = hit[1]
        if owner is g:
            g.pending[e.name] = max(0, g.pending[e.name] - 1)
            return True
        if g.n_accum == 0 and len(g.members) == 1 and owner.n_accum == 1 and owner.d_in == g.d_in:
            # First sight: this module reads the same tensor as owner's modules: one basis for all.
            inputs.remove(g)
            owner.members.append(e.name)
            owner.pending[e.name] = 0
            e.group = owner
            return True
    if g.pending.get(e.name):
        raise RuntimeError(
            f"modules {g.members} were found to share one input tensor, but {e.name!r} now receives a "
            f"different one; protect them separately (pass modules= with separate ActivationSubspace objects)"
        )
    return False


def record_reader(seen: SeenInputs, e: ProtectedModule, key: tuple, tensor: torch.Tensor) -> None:
    """After ``e``'s input was counted: the other modules of its input now owe this forward a read of it."""
    g = e.group
    for n in g.pending:
        if n != e.name:
            g.pending[n] += 1
    # A weak reference to the *storage*, not the tensor object: hooks that hand each module its own alias of one
    # input (DeepSpeed ZeRO-3 passes every module a fresh ``detach()`` of it) free the alias after the first
    # module's forward while the storage, and so the data_ptr of the key, stays the input's.
    seen[key] = (weakref.ref(tensor.untyped_storage()), g)


def check_pending(inputs: list[DistinctInput]) -> None:
    """At a forward's start and end: every module of a shared input received it (else reset and raise)."""
    for g in inputs:
        late = [n for n, c in g.pending.items() if c]
        if late:
            for n in g.pending:
                g.pending[n] = 0
            raise RuntimeError(
                f"modules {g.members} were found to share one input tensor, but {late} did not receive it in a "
                f"later forward; protect them separately (pass modules= with separate ActivationSubspace "
                f"objects) or observe forwards that call them all"
            )
