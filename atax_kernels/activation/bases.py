"""Turning what was observed into bases (``update()``): per distinct input the eigenvectors holding ``energy`` of
its normalised second moment (optionally contrasted with the safety side, optionally averaged over updates);
for LoRA layers ``lora_A`` confined off the input basis or the bases of ``A x``; for embeddings the protected
tokens."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .._dtensor import local
from .eigen import top_basis
from .inputs import ProtectedModule
from .moments import normalised_moments
from .settings import SIDES
from .stats import sq_norm

__all__ = ["BasesMixin"]


class BasesMixin:
    """``update()`` and what it computes (part of ``ActivationSubspace``)."""

    def update(self, decay: float = 0.0) -> None:
        """Recompute the bases from the second moments observed since the previous ``update()``.

        Args:
            decay: 0 (default) uses only what was observed since the last update; ``decay`` in (0, 1) keeps an
                exponential average ``M <- decay * M + (1 - decay) * C / n`` of the normalised moments.

        Inputs with nothing observed keep their previous basis. Under ``torch.distributed`` the moments and
        counts are summed over the data-parallel group first (a collective call: every rank must call it).
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= decay < 1.0):
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        if self._observing is not None:
            raise RuntimeError("update() inside observe(): leave the observe() context first")
        self._all_reduce()
        self._update_reduced(decay)

    def _update_reduced(self, decay: float) -> None:
        """``update()`` after the moments were summed over the group (each rank computes the same bases)."""
        for g in self._groups:
            cur = normalised_moments(g, decay)
            if cur is None:
                continue
            m = cur["capability"]
            if m is None:
                continue
            if self.contrast > 0 and cur["safety"] is not None:
                m = m - self.contrast * cur["safety"]
                psd = False
            else:
                psd = True
            u = self._basis(m, g.basis, psd, g.floor)
            if psd:
                tr = float(m.diagonal().sum())
                g.held = float(((m @ u.to(m.dtype)) * u.to(m.dtype)).sum()) / tr if tr > 0 else None
            else:
                g.held = None
            g.basis = u.to(self.basis_dtype)
            g.moment = m
        for e in self._entries:
            if e.kind == "lora" and self.lora == "both" and e.group.moment is not None:
                self._lora_b_bases(e)
            elif e.kind == "lora" and self.lora == "input":
                self._confine_lora_a(e)
            elif e.kind == "embedding":
                self._tokens(e, decay)
        for g in self._groups:
            g.moment = None
            for s in SIDES:
                g.acc[s], g.count[s] = None, 0.0
        self.updates += 1
        self._saturation_checks = 3

    def update_if_drifted(self, tol: float) -> bool:
        """``update()`` only if the bases no longer fit what was observed since the last update; else discard it.

        The check is :meth:`coverage` (no eigensolve): an input has drifted when the current basis holds less
        than ``min(energy, what it held of the moment it was built from) - tol`` of the capability moment
        observed now (below ``energy`` when ``max_rank`` capped it). With every input within ``tol`` the observed
        moments are dropped, the bases are kept and ``False`` is returned; otherwise ``update()`` runs (all
        inputs) and ``True`` is returned. Protected tokens (embeddings) are recomputed from the observed counts
        either way (no eigensolve); with ``lora="both"`` it always runs ``update()`` (the B bases follow A, which
        trains). Observe the *same* capability batches the bases were built from (as
        ``refresh()`` does), so the check measures the model's drift and not the sampling noise of new batches.
        Measured on SmolLM2-135M-Instruct (SFT, lr 3e-5, 30 steps, 4 fixed batches): bases rebuilt every 10 steps
        overlap the step-0 bases by 0.99 on average, while bases from 4 *other* batches overlap them by 0.79.

        Not available with ``contrast > 0`` (the basis is not a capability-energy basis) or after
        ``update(decay>0)`` (the averaged moment is not what was just observed): use ``update()`` there.
        """
        self._check_drift_args(tol, "update_if_drifted()")
        if self._observing is not None:
            raise RuntimeError("update_if_drifted() inside observe(): leave the observe() context first")
        self._all_reduce()
        fits = self.coverage()
        # an input observed now that has no basis yet needs the eigensolve; one not observed keeps its basis
        unseen = [g for g in self._groups if g.basis is None and g.acc["capability"] is not None]
        # against what each basis held of the moment it was built from (below energy when max_rank capped it)
        by_name = {g.members[0]: g for g in self._groups}
        drifted = [name for name, c in fits.items()
                   if c < min(self.energy, by_name[name].held if by_name[name].held is not None else 1.0) - tol]
        self.last_coverage = fits
        lora_b = self.lora == "both" and any(e.kind == "lora" for e in self._entries)
        if drifted or unseen or self.updates == 0 or lora_b:
            # lora="both": the B bases follow A, which trains, and coverage() does not measure them
            self._update_reduced(0.0)
            return True
        for e in self._entries:
            if e.kind == "embedding":
                self._tokens(e, 0.0)  # the protected tokens from the counts: no eigensolve, always refreshed
        for g in self._groups:
            for s in SIDES:
                g.acc[s], g.count[s] = None, 0.0
        return False

    def _check_drift_args(self, tol: Any, where: str) -> None:
        """Refuse what ``update_if_drifted`` cannot judge, before anything is observed or changed."""
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0.0 <= tol < 1.0):
            raise ValueError(f"{where}: tol must be a number in [0, 1), got {tol!r}")
        if self.contrast > 0:
            raise ValueError(f"{where} with contrast > 0: the bases come from the contrasted moment, not from the "
                             f"capability energy coverage() measures; call update()")
        if any(s is not None for g in self._groups for s in g.ema.values()) or \
                any(s is not None for e in self._entries if e.kind == "embedding" for s in e.ema_counts.values()):
            raise ValueError(f"{where} after update(decay>0): the bases come from the averaged moments; "
                             f"call update()")

    def _basis(self, m: torch.Tensor, prev: torch.Tensor | None, psd: bool, floor: float = 1e-12) -> torch.Tensor:
        # EIGH_MAX_DIM read from the object: an instance may lower it (tests reach subspace iteration cheaply)
        return top_basis(m, prev, psd, floor, energy=self.energy, max_rank=self.max_rank,
                         eigh_max_dim=self.EIGH_MAX_DIM)

    def _lora_b_bases(self, e: ProtectedModule) -> None:
        m = e.group.moment
        for a, lin in e.module.lora_A.items():
            A = lin.weight.detach().to(torch.float64)
            mb = A @ m @ A.t()
            e.lora_b_bases[a] = self._basis(mb, None, False, e.group.floor).to(self.basis_dtype)

    @torch.no_grad()
    def _confine_lora_a(self, e: ProtectedModule) -> None:
        """``lora="input"``: rows of every ``lora_A`` off the input basis, so ``B A x = 0`` on the span."""
        u = e.group.basis
        if u is None or u.shape[1] == 0:
            return
        for a, lin in e.module.lora_A.items():
            w = local(lin.weight.detach())  # FSDP2 shards A by rows: each row's projection is local
            wd = torch.float64 if w.dtype == torch.float64 else torch.float32
            uu = u.to(w.device, wd)
            before = float(sq_norm(w))
            wf = w.to(wd)
            w.copy_((wf - (wf @ uu) @ uu.t()).to(w.dtype))
            if before > 0 and float(sq_norm(w)) <= 1e-6 * before:
                warnings.warn(
                    f"{e.name}.lora_A.{a}: the protected basis (rank {u.shape[1]} of d_in {e.d_in}) covers every "
                    f"direction its rows had, so the adapter has no room to learn in; lower energy or max_rank",
                    UserWarning, stacklevel=3)

    def _tokens(self, e: ProtectedModule, decay: float) -> None:
        freq: dict[str, torch.Tensor | None] = {}
        any_new = False
        for s in SIDES:
            c = e.counts[s]
            new = c / c.sum() if c is not None and float(c.sum()) > 0 else None
            any_new = any_new or new is not None
            if decay > 0:
                if new is not None:
                    e.ema_counts[s] = new if e.ema_counts[s] is None else \
                        e.ema_counts[s].mul_(decay).add_(new, alpha=1.0 - decay)
                freq[s] = e.ema_counts[s]
            else:
                freq[s] = new
            e.counts[s] = None
        if not any_new or freq["capability"] is None:
            return
        score = freq["capability"]
        if self.contrast > 0 and freq["safety"] is not None:
            score = score - self.contrast * freq["safety"]
        if self.energy == 0:
            e.tokens = torch.zeros(0, dtype=torch.long, device=score.device)
            return
        order = torch.argsort(score, descending=True, stable=True)
        n_pos = int((score > 0).sum())
        if self.max_rank is not None:
            n_pos = min(n_pos, self.max_rank)
        e.tokens = torch.sort(order[:n_pos]).values.to(e.module.weight.device)
