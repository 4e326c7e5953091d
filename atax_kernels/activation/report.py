"""Reporting on an ``ActivationSubspace``: the basis ranks, how well the bases still fit newly observed data
(coverage), which modules share an input, the bytes the bases take, and its ``repr``."""
from __future__ import annotations

__all__ = ["ReportMixin"]


class ReportMixin:
    """``ranks``, ``coverage``, ``groups``, ``memory_bytes`` and ``repr`` (part of ``ActivationSubspace``)."""

    def ranks(self) -> dict[str, int]:
        """Per protected module name: its basis rank (protected tokens for embeddings). A LoRA layer ``name``
        has ``name`` (the input basis A is kept off) and ``name.lora_B`` (the basis of B's input ``A x`` its
        update is projected off: 0 with ``lora="input"``, where B needs none; the largest over adapters)."""
        out: dict[str, int] = {}
        for e in self._entries:
            if e.kind == "embedding":
                out[e.name] = 0 if e.tokens is None else int(e.tokens.numel())
            else:
                out[e.name] = 0 if e.group.basis is None else int(e.group.basis.shape[1])
            if e.kind == "lora":
                out[e.name + ".lora_B"] = max((int(u.shape[1]) for u in e.lora_b_bases.values()), default=0)
        return out

    def coverage(self) -> dict[str, float]:
        """How well the current bases still fit: per distinct input (keyed by its first module's name), the
        fraction ``tr(U^T C U) / tr(C)`` of the capability second moment observed since the last ``update()``
        that the current basis holds.

        Observe the capability data again with the model as it is now, call ``coverage()`` *before*
        ``update()``: values close to ``energy`` mean the bases have not moved and refreshing would change
        little (refresh less often); values well below mean the inputs drifted out of the protected span.
        Inputs with nothing observed or no basis are left out.
        """
        out: dict[str, float] = {}
        for g in self._groups:
            c = g.acc["capability"]
            if c is None or g.basis is None:
                continue
            tr = float(c.diagonal().sum())
            if not tr > 0:
                continue
            u = g.basis.to(c.device, c.dtype)
            out[g.members[0]] = float(((c @ u) * u).sum()) / tr
        return out

    def groups(self) -> list[list[str]]:
        """The module names sharing each distinct input (found at run time by ``observe``)."""
        return [list(g.members) for g in self._groups]

    def memory_bytes(self) -> int:
        """Bytes the persistent bases occupy: ``sum d_in * r * itemsize`` over distinct inputs (and LoRA B
        bases), plus 8 bytes per protected token."""
        n = 0
        for g in self._groups:
            if g.basis is not None:
                n += g.basis.numel() * g.basis.element_size()
        for e in self._entries:
            for u in e.lora_b_bases.values():
                n += u.numel() * u.element_size()
            if e.kind == "embedding" and e.tokens is not None:
                n += e.tokens.numel() * e.tokens.element_size()
        return n

    def __repr__(self) -> str:
        r = list(self.ranks().values())
        return (f"ActivationSubspace(modules={len(self._entries)}, inputs={len(self._groups)}, energy={self.energy}, "
                f"contrast={self.contrast}, rank_mean={sum(r) / max(1, len(r)):.1f}, bytes={self.memory_bytes()})")
