"""Projecting updates (``project_updates_``): each protected weight's update off its input's basis (one batched
``remove_span_`` call), the protected token rows of embeddings and the frozen biases and norm weights zeroed,
with the step's :class:`ActivationStats` and a warning when nothing trains any more."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .._dtensor import is_dtensor, local
from .._warn import user_stacklevel
from .discovery import projected_weights
from .stats import ActivationStats, sq_norm

__all__ = ["ProjectMixin", "SATURATED_FRACTION"]

#: A step that removes at least this fraction of every protected update (by norm) is reported once.
SATURATED_FRACTION = 0.999


class ProjectMixin:
    """The parameters the projection touches and the projection itself (part of ``ActivationSubspace``)."""

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter whose update the projection touches (weights of protected modules, and biases or
        norm weights when frozen), each once."""
        out, seen = [], set()
        for e in self._entries:
            for _, p, _ in projected_weights(e, self.lora):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        for _, p in self._frozen:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def project_updates_(self, params: list[torch.Tensor], deltas: list[torch.Tensor], *,
                         backend: str | None = None) -> ActivationStats:
        """Project the updates ``deltas[i]`` (same shapes as ``params[i]``, detached) in place.

        ``params`` must be a subset of :meth:`parameters` (others are ignored and left unchanged).
        Returns the step's :class:`ActivationStats`. Everything that can fail (sharded layouts, the op's
        checks) is checked before any delta is written, so on an error ``deltas`` are unchanged.
        """
        from ..ops import remove_span_  # looked up per call: tests substitute a failing one

        zero_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # written only after the op succeeded
        zero_all: list[torch.Tensor] = []
        where = {id(p): i for i, p in enumerate(params)}
        targets: list[torch.Tensor] = []
        bases: list[torch.Tensor | None] = []
        names: list[str] = []
        row_parts: list[torch.Tensor] = []
        row_names: list[str] = []
        for e in self._entries:
            for label, p, role in projected_weights(e, self.lora):
                i = where.get(id(p))
                if i is None:
                    continue
                d = local(deltas[i])
                if role == "rows":
                    if e.tokens is None or e.tokens.numel() == 0:
                        continue
                    if is_dtensor(params[i]) or is_dtensor(deltas[i]):
                        raise NotImplementedError(f"{label}: sharded (DTensor) embeddings are not supported")
                    rows = d.index_select(0, e.tokens)
                    row_parts.append(torch.stack([sq_norm(d), sq_norm(rows)]))
                    row_names.append(label)
                    zero_rows.append((d, e.tokens))
                    continue
                if role == "dense_t":
                    if is_dtensor(params[i]) or is_dtensor(deltas[i]):
                        raise NotImplementedError(f"{label}: a sharded Conv1D weight ([d_in, d_out] rows) cannot "
                                                  f"be projected locally")
                    d = d.t()
                if role.startswith("lora_b:"):
                    basis = e.lora_b_bases.get(role[7:])
                else:
                    basis = e.group.basis
                if basis is not None and basis.device != d.device:
                    basis = basis.to(d.device)
                    if role.startswith("lora_b:"):
                        e.lora_b_bases[role[7:]] = basis
                    else:
                        e.group.basis = basis
                targets.append(d)
                bases.append(basis if basis is not None and basis.shape[1] > 0 else None)
                names.append(label)
        for label, p in self._frozen:
            i = where.get(id(p))
            if i is None:
                continue
            d = local(deltas[i])
            row_parts.append(torch.stack([sq_norm(d), sq_norm(d)]))
            row_names.append(label)
            zero_all.append(d)
        dev = deltas[0].device if deltas else torch.device("cpu")
        if targets:
            per = remove_span_(targets, bases, backend=backend)
        else:
            per = torch.zeros((0, 2), dtype=torch.float64, device=dev)
        for d, tokens in zero_rows:
            d.index_fill_(0, tokens, 0)
        for d in zero_all:
            d.zero_()
        n_checked = per.shape[0] + len(row_parts) - len(zero_all)  # frozen biases/norms are zeroed on purpose
        if row_parts:
            per = torch.cat([per, torch.stack(row_parts).to(per.device)])
        if self._saturation_checks > 0 and not self._warned_saturated:
            self._saturation_checks -= 1  # a host sync: only on the first steps after each update()
            self._warn_if_saturated(names + row_names, per[:n_checked])
        tot = per.sum(0) if per.numel() else torch.zeros(2, dtype=torch.float64, device=dev)
        frac = torch.where(tot[0] > 0, (tot[1] / tot[0].clamp_min(1e-300)).sqrt(), tot.new_zeros(()))
        return ActivationStats(ranks=self.ranks(), names=names + row_names, per_target=per,
                               update_removed_fraction=frac)

    def _warn_if_saturated(self, names: list[str], per: torch.Tensor) -> None:
        """Warn (once) when the projection removed >= 99.9 % of the update of every protected parameter that
        had one: the run is then not training, only paying for it."""
        if per.numel() == 0:
            return
        rows = per.detach().cpu().tolist()
        moved = [(n, b, r) for n, (b, r) in zip(names, rows) if b > 0]
        if not moved or any(r < SATURATED_FRACTION ** 2 * b for _, b, r in moved):
            return
        self._warned_saturated = True
        shown = ", ".join(n for n, _, _ in moved[:6]) + (f" and {len(moved) - 6} more" if len(moved) > 6 else "")
        lora_both = self.lora == "both" and any(e.kind == "lora" for e in self._entries)
        advice = ("with LoRA use lora='input' (the default): B's input A x is only r-dimensional, so its basis "
                  "covers all of it and B never moves" if lora_both else
                  "lower energy (or set max_rank), protect fewer modules (modules=), or check that the capability "
                  "data is not the training data itself")
        warnings.warn(
            f"ActivationSubspace: this step's projection removed >= {SATURATED_FRACTION:.1%} of the update of every "
            f"protected parameter ({shown}): the model is barely training. {advice}. (Warned once.)",
            UserWarning, stacklevel=user_stacklevel())
