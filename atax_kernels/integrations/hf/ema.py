"""The HF ``EMA`` reference: a persistent moving average of capability gradients (the fold itself is the one in
:mod:`atax_kernels.references.ema`), and :func:`source_of`, the capability source behind a gradient reference."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...references.ema import capture_verdict, fold_ema_
from .norms import global_sq_norm
from .sources import CapabilitySource, as_source

__all__ = ["EMA", "source_of"]


class EMA:
    """An exponential moving average of capability gradients: ``attach(trainer, reference=EMA(loader, beta=0.9))``.

    Each refresh folds the fresh capability gradient in (``e <- beta e + (1 - beta) g``; the first one is
    copied). Memory: one copy of the trainable parameters in ``reference_dtype`` (``attach`` argument; default
    the gradient's dtype). Non-finite or all-zero captures are not folded in. Saved in trainer checkpoints.

    Args:
        source: what :class:`CapabilitySource` accepts (iterable of batches, callable ``(model) -> loss``) or a
            ``CapabilitySource``.
        beta: decay in [0, 1).
    """

    def __init__(self, source: Any, *, beta: float = 0.9):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if isinstance(source, EMA):
            raise TypeError("EMA cannot be the source of an EMA")
        self.source = as_source(source)
        self.beta = float(beta)
        self.buffers: list[torch.Tensor | None] = []
        self.count = 0

    def fold(self, captured: list[torch.Tensor | None], inv_scale: float, dtype: torch.dtype | None) -> bool:
        """Fold one capture (aligned with the optimizer's parameters; ``inv_scale`` undoes the loss scale) into
        the average, in ``dtype`` (default the capture's). Returns whether it was folded: a capture that is
        empty, non-finite or all zero is not (its norm is the global one, so all FSDP2 ranks agree)."""
        present = [t for t in captured if t is not None]
        if not present:
            return False
        # float32 norms as before the move to the shared fold: a half-precision norm could overflow to inf
        if capture_verdict(float(global_sq_norm(present, dtype=torch.float32))) != "fold":
            return False
        if self.buffers and len(self.buffers) != len(captured):
            raise ValueError(f"the optimizer's parameter list changed size ({len(self.buffers)} -> "
                             f"{len(captured)}) since the EMA was created")
        if not self.buffers:
            self.buffers = [None] * len(captured)
        fold_ema_(self.buffers, captured, first=self.count == 0, beta=self.beta, inv_scale=inv_scale, dtype=dtype)
        self.count += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """``{"beta", "count", "buffers"}`` (buffers detached copies; None where a parameter had no gradient)."""
        return {"beta": self.beta, "count": self.count,
                "buffers": [None if t is None else t.detach().clone() for t in self.buffers]}

    def load_state_dict(self, state: Mapping[str, Any], params: list[torch.Tensor] | None = None) -> None:
        """Load :meth:`state_dict`; with ``params``, check the buffers' count and shapes against them and move
        each buffer to its parameter's device."""
        buffers = list(state["buffers"])
        if params is not None:
            if buffers and len(buffers) != len(params):
                raise ValueError(f"EMA state covers {len(buffers)} parameters, the optimizer has {len(params)}")
            for i, (t, p) in enumerate(zip(buffers, params)):
                if t is not None and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"EMA state tensor {i} has shape {tuple(t.shape)}, parameter has "
                                     f"{tuple(p.shape)}")
            buffers = [None if t is None else t.to(p.device) for t, p in zip(buffers, params)]
        self.buffers = buffers
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"EMA(beta={self.beta}, count={self.count}, source={self.source!r})"


def source_of(reference: Any) -> CapabilitySource | None:
    """The capability source a reference draws from: an EMA's, the source itself, None for a Subspace or an
    ActivationSubspace."""
    if isinstance(reference, EMA):
        return reference.source
    return reference if isinstance(reference, CapabilitySource) else None
