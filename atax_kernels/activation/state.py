"""Saving and restoring an ``ActivationSubspace`` (``state_dict``/``load_state_dict``): settings, shared-input
groups, bases, protected tokens and the moments observed since the last ``update()``."""
from __future__ import annotations

from typing import Any

import torch

from .discovery import projected_weights
from .inputs import DistinctInput
from .settings import SIDES

__all__ = ["StateMixin"]


class StateMixin:
    """``state_dict`` and ``load_state_dict`` (part of ``ActivationSubspace``)."""

    def state_dict(self) -> dict[str, Any]:
        """Settings, groups, bases, protected tokens, (with ``update(decay>0)``) the averaged moments, and the
        moments observed since the last ``update()`` (per side, with their counts: e.g. the training batches
        observed as the safety side between refreshes), so a resumed run's next ``update()`` is the same."""
        return {
            "version": 2,
            "settings": {"energy": self.energy, "contrast": self.contrast, "max_rank": self.max_rank,
                         "basis_dtype": str(self.basis_dtype).replace("torch.", ""), "biases": self.biases,
                         "norms": self.norms, "lora": self.lora, "weighting": self.weighting},
            "updates": self.updates,
            "groups": [{"modules": list(g.members), "d_in": g.d_in,
                        "basis": None if g.basis is None else g.basis.detach().cpu().clone(),
                        "ema": {s: (None if g.ema[s] is None else g.ema[s].cpu().clone()) for s in SIDES},
                        "acc": {s: (None if g.acc[s] is None else g.acc[s].detach().cpu().clone()) for s in SIDES},
                        "count": {s: float(g.count[s]) for s in SIDES}}
                       for g in self._groups],
            "lora_b": {e.name: {a: u.cpu().clone() for a, u in e.lora_b_bases.items()}
                       for e in self._entries if e.lora_b_bases},
            "tokens": {e.name: (None if e.tokens is None else e.tokens.cpu().clone())
                       for e in self._entries if e.kind == "embedding"},
            "token_ema": {e.name: {s: (None if e.ema_counts[s] is None else e.ema_counts[s].cpu().clone())
                                   for s in SIDES} for e in self._entries if e.kind == "embedding"},
            "token_counts": {e.name: {s: (None if e.counts[s] is None else e.counts[s].cpu().clone())
                                      for s in SIDES} for e in self._entries if e.kind == "embedding"},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto the same model structure (checked before anything changes)."""
        if not isinstance(state, dict) or state.get("version") not in (1, 2) or "groups" not in state:
            raise ValueError("state was not produced by ActivationSubspace.state_dict() (version 1 or 2)")
        by_name = {e.name: e for e in self._entries}
        dense = {e.name for e in self._entries if e.kind != "embedding"}
        listed: list[str] = []
        for j, gs in enumerate(state["groups"]):
            for n in gs["modules"]:
                if n not in dense:
                    raise ValueError(f"state groups[{j}] names module {n!r}, which this ActivationSubspace does "
                                     f"not protect")
                if by_name[n].d_in != gs["d_in"]:
                    raise ValueError(f"state groups[{j}]: module {n!r} has d_in {by_name[n].d_in}, state "
                                     f"{gs['d_in']}")
            b = gs["basis"]
            if b is not None and (b.dim() != 2 or b.shape[0] != gs["d_in"]):
                raise ValueError(f"state groups[{j}] basis has shape {tuple(b.shape)}; expected [{gs['d_in']}, r]")
            for side, a in (gs.get("acc") or {}).items():   # version 2: moments since the last update()
                if side not in SIDES or (a is not None and tuple(a.shape) != (gs["d_in"], gs["d_in"])):
                    raise ValueError(f"state groups[{j}] acc[{side!r}] has shape "
                                     f"{None if a is None else tuple(a.shape)}; expected [{gs['d_in']}, {gs['d_in']}]")
            listed += gs["modules"]
        if sorted(listed) != sorted(dense):
            raise ValueError(f"state covers modules {sorted(listed)}, this ActivationSubspace protects "
                             f"{sorted(dense)}")
        for n in set(state.get("tokens", {})) | set(state.get("token_counts", {})):
            if n not in by_name or by_name[n].kind != "embedding":
                raise ValueError(f"state names embedding {n!r}, which this ActivationSubspace does not protect")
        for n, cs in state.get("token_counts", {}).items():
            for side, c in cs.items():
                if side not in SIDES or (c is not None and tuple(c.shape) != (by_name[n].d_in,)):
                    raise ValueError(f"state token_counts[{n!r}][{side!r}] has shape "
                                     f"{None if c is None else tuple(c.shape)}; expected [{by_name[n].d_in}]")
        s = state["settings"]
        self.energy, self.contrast, self.max_rank = s["energy"], s["contrast"], s["max_rank"]
        self.basis_dtype = getattr(torch, s["basis_dtype"])
        # states saved before these settings existed were made with the rules of that time
        self.lora, self.weighting = s.get("lora", "both"), s.get("weighting", "energy")
        self.updates = int(state.get("updates", 0))
        self._groups = []
        for gs in state["groups"]:
            first = by_name[gs["modules"][0]]
            g = DistinctInput(gs["d_in"], projected_weights(first, self.lora)[0][1].device)
            g.members = list(gs["modules"])
            g.pending = {n: 0 for n in g.members}
            g.n_accum = 1 if len(g.members) > 1 else 0
            g.basis = None if gs["basis"] is None else gs["basis"].to(g.device, self.basis_dtype)
            g.ema = {k: (None if v is None else v.to(g.device)) for k, v in gs.get("ema", {}).items()} or \
                {k: None for k in SIDES}
            # version 1 states hold no in-progress moments: the next update() sees only what comes after
            acc = gs.get("acc") or {}
            g.acc = {k: (None if acc.get(k) is None else acc[k].to(g.device, torch.float64)) for k in SIDES}
            g.count = {k: float((gs.get("count") or {}).get(k, 0.0)) for k in SIDES}
            for n in g.members:
                by_name[n].group = g
            self._groups.append(g)
        for e in self._entries:
            if e.kind == "lora":
                e.lora_b_bases = {a: u.to(e.group.device, self.basis_dtype)
                                  for a, u in state.get("lora_b", {}).get(e.name, {}).items()}
            if e.kind == "embedding":
                t = state.get("tokens", {}).get(e.name)
                e.tokens = None if t is None else t.to(e.module.weight.device)
                ema = state.get("token_ema", {}).get(e.name, {})
                e.ema_counts = {k: (None if ema.get(k) is None else ema[k].to(e.module.weight.device)) for k in SIDES}
                cnt = state.get("token_counts", {}).get(e.name, {})
                e.counts = {k: (None if cnt.get(k) is None else cnt[k].to(e.module.weight.device, torch.float64))
                            for k in SIDES}
