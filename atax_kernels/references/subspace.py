"""``Subspace``: a persistent orthonormal basis over a parameter list (GPM/OGD-style capability memory)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from .. import _validate as validate
from ..ops import combine_, gram


class Subspace:
    """An orthonormal basis ``B`` (rows), each basis vector a list of tensors shaped like the parameters.

    Memory: ``rank`` copies of the parameters in ``dtype`` (default: each parameter's dtype). Projecting
    against it needs no solve (``G = I``): ``project_(grads, subspace)`` removes ``B^T B g``.

    Args:
        params_or_tensors: parameters (or tensors) fixing the shapes, device and default dtypes.
        max_rank: the most basis vectors kept.
        dtype: storage dtype of the basis (e.g. ``torch.bfloat16`` halves the memory of fp32).
    """

    def __init__(self, params_or_tensors: Iterable[torch.Tensor], *, max_rank: int, dtype: torch.dtype | None = None):
        tensors = list(params_or_tensors)
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"params_or_tensors[{i}] is a {type(t).__name__}, expected a torch.Tensor")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        if dtype is not None and dtype not in validate.SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.shapes = [tuple(t.shape) for t in tensors]
        self.dtypes = [dtype or (t.dtype if t.dtype in validate.SUPPORTED_DTYPES else torch.float32) for t in tensors]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.max_rank = max_rank
        self.basis: list[list[torch.Tensor]] = []

    @property
    def rank(self) -> int:
        """Number of basis vectors held."""
        return len(self.basis)

    def _check_vector(self, vec: Sequence[torch.Tensor], label: str) -> list[torch.Tensor]:
        lst = validate.as_tensor_list(list(vec), label) if not isinstance(vec, torch.Tensor) else [vec]
        if len(lst) != len(self.shapes):
            raise ValueError(f"{label} has {len(lst)} tensors but the subspace has {len(self.shapes)}")
        for i, (t, shape) in enumerate(zip(lst, self.shapes)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{label}[{i}] has shape {tuple(t.shape)} but the subspace expects {shape}")
        return lst

    def add(self, vectors: Any, *, tol: float = 1e-6, evict: str | None = None, backend: str | None = None) -> int:
        """Orthonormalise new directions against the basis and append the independent ones.

        Each candidate is copied into basis storage, orthogonalised against the basis twice (classical
        Gram–Schmidt with re-orthogonalisation, through ``gram``/``combine_``), and dropped when what is left
        is below ``tol`` of its original norm (dependent within the relative tolerance) or non-finite.

        Args:
            vectors: one direction (a sequence of tensors parallel to the parameters) or several.
            tol: relative tolerance for dependence.
            evict: None (default) refuses to grow past ``max_rank`` with a ValueError; ``"oldest"`` drops
                the oldest basis vectors to make room.

        Returns:
            The number of directions added.
        """
        if evict not in (None, "oldest"):
            raise ValueError(f"unknown evict {evict!r}; expected None or 'oldest'")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        candidates = validate.normalize_refs(vectors, "vectors")
        candidates = [self._check_vector(c, f"vectors[{j}]") for j, c in enumerate(candidates)]
        added = 0
        for cand in candidates:
            v = [t.detach().to(device=self.device, dtype=d).clone() for t, d in zip(cand, self.dtypes)]
            if not v:
                continue
            norm0 = math.sqrt(max(float(gram([v], backend=backend)[0, 0]), 0.0))
            if not math.isfinite(norm0) or norm0 == 0.0:
                continue
            for _ in range(2):
                if self.basis:
                    G = gram([v, *self.basis], backend=backend)
                    combine_(v, self.basis, G[0, 1:].contiguous(), backend=backend)
            norm = math.sqrt(max(float(gram([v], backend=backend)[0, 0]), 0.0))
            if not math.isfinite(norm) or norm <= tol * norm0:
                continue
            if self.rank >= self.max_rank:
                if evict != "oldest":
                    raise ValueError(
                        f"Subspace is full (max_rank={self.max_rank}); pass evict='oldest' to replace the oldest "
                        f"direction or build a Subspace with a larger max_rank"
                    )
                self.basis.pop(0)
            torch._foreach_mul_(v, 1.0 / norm)
            self.basis.append(v)
            added += 1
        return added

    def to(self, *args: Any, **kwargs: Any) -> "Subspace":
        """Move/cast the basis like ``Tensor.to`` (in place; returns self)."""
        self.basis = [[t.to(*args, **kwargs) for t in vec] for vec in self.basis]
        if self.basis and self.basis[0]:
            self.device = self.basis[0][0].device
            self.dtypes = [t.dtype for t in self.basis[0]]
        else:
            probe = torch.empty(0, device=self.device).to(*args, **kwargs)
            self.device = probe.device
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"shapes": self.shapes, "dtypes": [str(d) for d in self.dtypes], "max_rank": self.max_rank,
                "basis": [[t.clone() for t in vec] for vec in self.basis]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [tuple(s) for s in state["shapes"]] != self.shapes:
            raise ValueError("Subspace state was saved for different parameter shapes")
        self.max_rank = int(state["max_rank"])
        self.basis = [[t.to(self.device) for t in vec] for vec in state["basis"]]
        if self.basis:
            self.dtypes = [t.dtype for t in self.basis[0]]

    def __repr__(self) -> str:
        return f"Subspace(rank={self.rank}, max_rank={self.max_rank}, tensors={len(self.shapes)})"
