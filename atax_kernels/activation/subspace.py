"""``ActivationSubspace``: the object that holds the per-layer bases of the capability data's input activations
(construction, the checks that it protects what is trained); its parts live in the mixins it is made of. See the
package docstring (``atax_kernels/activation/__init__.py``) for what it protects and how."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .bases import BasesMixin
from .discovery import (SeenInputs, check_no_shared_weights, find_frozen, find_protected, lora_kind,
                        projected_weights)
from .eigen import EIGH_MAX_DIM
from .inputs import DistinctInput, ProtectedModule
from .loaders import LoaderMixin
from .moments import ObserveMixin
from .project import ProjectMixin
from .report import ReportMixin
from .settings import (FREE_OR_FREEZE, LORA_RULES, WEIGHTINGS, check_contrast, check_energy, check_max_rank,
                       check_one_of)
from .state import StateMixin

__all__ = ["ActivationSubspace"]


class ActivationSubspace(ObserveMixin, BasesMixin, ProjectMixin, ReportMixin, StateMixin, LoaderMixin):
    """Per-layer bases of the capability data's input activations; see the package docstring.

    Args:
        model: the model whose modules are protected (its forward is observed through hooks).
        energy: fraction in [0, 1] of each second moment's trace (of its positive part with contrast) the
            basis holds. 1.0 protects every observed direction, 0.0 none.
        contrast: beta >= 0. With beta > 0 the bases are the top eigenvectors of
            ``C_cap / n_cap - beta * C_safety / n_safety`` (``observe(side="safety")`` feeds C_safety).
        max_rank: at most this many basis vectors (protected tokens) per distinct input; None: no cap.
        modules: exactly these modules (objects or names from ``model.named_modules()``) instead of every
            supported one. An unsupported module given here is a TypeError.
        basis_dtype: dtype of the stored bases (float32; bfloat16 halves their memory).
        biases: ``"freeze"`` (default, measured: zero the bias updates of protected modules) or ``"free"``.
        norms: ``"freeze"`` (default, measured: zero the updates of normalisation weights, i.e. the parameters
            of modules named ``*Norm``/``LayerNorm``/``GroupNorm``) or ``"free"``.
        lora: how PEFT LoRA layers (``W + B A``) are protected. ``"input"`` (default): at every ``update()``
            each ``lora_A`` is projected off the layer's input basis (``A <- A - (A U) U^T``; with PEFT's
            ``B = 0`` start this does not change the model) and so are A's updates; then ``B A x = 0`` on the
            protected span whatever B does, so B trains freely on what the capability inputs do not use.
            ``"both"``: A's update with the input basis and B's with the basis of ``A x`` (A itself is never
            edited). B's input ``A x`` is only ``r_lora``-dimensional, so at high energy that basis covers all
            of it and B (which starts at zero) never moves: nothing trains. Kept for adapters that must not be
            edited; a step that removes >= 99.9 % of every update warns.
        weighting: how each observed position counts. ``"token"`` (default): by its direction only
            (``x / |x|``), so ``energy`` is the mean fraction of each capability token's input the basis holds,
            the same statement in every layer. ``"energy"``: by ``|x|^2`` (the raw ``sum x x^T``); pretrained
            transformers have outlier ("massive activation") positions whose one channel then holds most of
            the trace, so a layer can get rank 1-4 at energy 0.99 and be left unprotected. Measured on
            SmolLM2-135M-Instruct, capital-city answers, 368 tokens: raw weighting gave MLP down-projections of
            layers 1 and 9 rank 9 and 8 at energy 0.9 (top eigenvalue 74 % and 82 % of the trace) while the
            other layers got 26-32; by token every layer got 26-35.
        process_group: the data-parallel group to sum second moments over in ``update()`` (default: the
            default group when ``torch.distributed`` is initialised, else no communication).
    """

    EIGH_MAX_DIM = EIGH_MAX_DIM

    def __init__(
        self,
        model: nn.Module,
        *,
        energy: float = 0.99,
        contrast: float = 0.0,
        max_rank: int | None = None,
        modules: Iterable[nn.Module | str] | None = None,
        basis_dtype: torch.dtype = torch.float32,
        biases: str = "freeze",
        norms: str = "freeze",
        lora: str = "input",
        weighting: str = "token",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.energy = check_energy(energy)
        self.contrast = check_contrast(contrast)
        self.max_rank = check_max_rank(max_rank)
        if not isinstance(basis_dtype, torch.dtype) or not basis_dtype.is_floating_point:
            raise TypeError(f"basis_dtype must be a floating torch.dtype, got {basis_dtype!r}")
        check_one_of(biases, "biases", FREE_OR_FREEZE)
        check_one_of(norms, "norms", FREE_OR_FREEZE)
        check_one_of(lora, "lora", LORA_RULES)
        check_one_of(weighting, "weighting", WEIGHTINGS)
        self.weighting = weighting
        self.basis_dtype, self.biases, self.norms, self.lora = basis_dtype, biases, norms, lora
        self.process_group = process_group
        self.model = model
        self._entries = find_protected(model, modules)
        self._frozen = find_frozen(model, self._entries, energy=self.energy, biases=biases, norms=norms)
        check_no_shared_weights(self._entries, lora)
        # one input per module to start with; observe() merges the modules found to read one tensor
        self._groups: list[DistinctInput] = []
        for e in self._entries:
            if e.kind != "embedding":
                self._add_input(e)
        self._observing: str | None = None
        self._mask: torch.Tensor | None = None
        self._seen: SeenInputs = {}
        self._handles: list[Any] = []
        self._depth = 0
        self._staged = False
        self.updates = 0
        #: per distinct input, the coverage() measured by the last update_if_drifted()
        self.last_coverage: dict[str, float] = {}
        self.skipped_batches = 0
        self.last_skip_reason: str | None = None
        self.loader: Any = None
        self.max_batches: int | None = None
        self.forward_fn: Callable[[nn.Module, Any], Any] | None = None
        self.positions: str | None = None  # from_loader's choice, observe_loader's default
        self._saturation_checks = 0  # steps after an update() whose removed fractions are inspected (host sync)
        self._warned_saturated = False
        self._explicit_mask = False

    def _add_input(self, e: ProtectedModule) -> DistinctInput:
        g = DistinctInput(e.d_in, projected_weights(e, self.lora)[0][1].device)
        g.members.append(e.name)
        g.pending[e.name] = 0
        self._groups.append(g)
        e.group = g
        return g

    def has_observed(self) -> bool:
        """True once any capability forward was observed (bases computed, or moments waiting for ``update()``)."""
        if self.updates > 0:
            return True
        if any(g.acc["capability"] is not None for g in self._groups):
            return True
        return any(e.kind == "embedding" and e.counts["capability"] is not None for e in self._entries)

    def check_protects(self, params: Iterable[torch.Tensor], *, where: str) -> None:
        """Raise ``ValueError`` unless every weight this subspace projects is one of ``params`` (the parameters
        a trainer or optimizer updates) and trainable, naming the modules that are not.

        Catches the setups that would otherwise run with no protection and no word: a subspace built on another
        model object than the one being trained, one built before ``get_peft_model`` (its modules are now frozen
        base layers, the adapters unprotected), an optimizer over parameters the subspace does not cover.
        """
        trained = {id(p) for p in params}
        missing: list[str] = []
        frozen: list[str] = []
        for e in self._entries:
            for label, p, _ in projected_weights(e, self.lora):
                if id(p) not in trained:
                    missing.append(label)
                elif not p.requires_grad:
                    frozen.append(label)
        if not missing and not frozen:
            return
        bad = missing or frozen
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        n_all = sum(len(projected_weights(e, self.lora)) for e in self._entries)
        if missing:
            why = (f"{len(missing)} of the {n_all} weights this ActivationSubspace protects are not parameters "
                   f"{where} updates ({shown})")
        else:
            why = f"{len(frozen)} of the {n_all} weights this ActivationSubspace protects are frozen ({shown})"
        lora_now = [n for n, m in self.model.named_modules() if lora_kind(m) is not None] if self.model else []
        hint = ("it was built on another model object, or before get_peft_model() (its modules are now frozen "
                "base layers and the adapters are unprotected). Build it on the model being trained, after "
                "get_peft_model()" + (" (that model has LoRA layers; this subspace protects none)"
                                      if lora_now and not any(e.kind == "lora" for e in self._entries) else "")
                + ", or pass modules= to protect only trained modules")
        raise ValueError(f"{why}: {hint}")
