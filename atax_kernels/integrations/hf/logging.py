"""The ``atax/*`` logging window of :class:`~.handle.AtaxHandle`: each optimizer step's values are added on the
device (no host sync), and a log reports their means over the steps since the previous log (the trainer's
``logging_steps`` window, as HF averages ``loss``); ``atax/skipped`` is the fraction of skipped steps, the other
values average the steps that were not skipped."""
from __future__ import annotations

from typing import Any

import torch

from ...activation import ActivationStats, ActivationSubspace
from ...projection import ProjectionStats

__all__ = ["LoggingWindow"]


def _per_reference(key: str, values: list[float]) -> dict[str, float]:
    """``atax/<key>`` for one reference, ``atax/<key>/<j>`` for several (scalars every logger accepts)."""
    if len(values) == 1:
        return {f"atax/{key}": float(values[0])}
    return {f"atax/{key}/{j}": float(v) for j, v in enumerate(values)}


class LoggingWindow:
    """Mixin of :class:`~.handle.AtaxHandle`: the window (``self._window``) and the values a log reports.

    Reads ``mode``, ``strength``, ``granularity``, ``log_tax_rate``, ``reference``, ``last_stats``,
    ``last_ref_norm`` and ``last_activation`` of the handle."""

    # -- one step's values (float64 device tensors) --------------------------------------------------------
    def _step_values(self, s: ProjectionStats, ref_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """This gradient-projection step's loggable values as float64 device tensors (no host sync)."""
        values = {"cosine": s.cosines.detach().to(torch.float64),
                  "removed_fraction": s.removed_fraction.detach().to(torch.float64).reshape(()),
                  "ref_norm": ref_norm.detach().to(torch.float64).to(s.cosines.device)}
        if getattr(self, "log_tax_rate", False):
            if s.cosines.numel() == 1:
                values["tax_rate"] = values["cosine"][0] ** 2
            elif self.mode == "orthogonal" and self.granularity == "global" and self.strength > 0:
                values["tax_rate"] = torch.clamp((values["removed_fraction"] / self.strength) ** 2, max=1.0)
        return values

    @staticmethod
    def _activation_step_values(a: ActivationStats) -> dict[str, torch.Tensor]:
        """An activation-projection step's loggable values as float64 device tensors (no host sync)."""
        frac = a.update_removed_fraction.detach().to(torch.float64).reshape(())
        values = {"feature_rank_mean": torch.full((), a.feature_rank_mean, dtype=torch.float64, device=frac.device),
                  "update_removed_fraction": frac}
        if a.lora_b_rank_max is not None:  # LoRA: B's factor shown too (0 with lora="input": B trains freely)
            values["lora_b_rank_max"] = torch.full((), float(a.lora_b_rank_max), dtype=torch.float64,
                                                   device=frac.device)
        return values

    # -- the window ----------------------------------------------------------------------------------------
    def _window_add(self, values: dict[str, torch.Tensor], skipped: torch.Tensor | None = None) -> None:
        """Add one step to the logging window. A change in the values' shapes (the number of references grew)
        restarts the window at this step."""
        shapes = {k: tuple(v.shape) for k, v in values.items()}
        w = getattr(self, "_window", None)
        if w is None or w["shapes"] != shapes:
            dev = next(iter(values.values())).device
            w = self._window = {"shapes": shapes, "n": 0, "n_ok": torch.zeros((), dtype=torch.float64, device=dev),
                                "all": {k: torch.zeros_like(v) for k, v in values.items()},
                                "ok": {k: torch.zeros_like(v) for k, v in values.items()}}
        ok = (torch.ones((), dtype=torch.bool, device=w["n_ok"].device) if skipped is None
              else ~skipped.detach().to(w["n_ok"].device))
        for k, v in values.items():
            w["all"][k] += v
            w["ok"][k] += torch.where(ok, v, torch.zeros_like(v))
        w["n"] += 1
        w["n_ok"] += ok.to(torch.float64)

    def _window_means(self) -> tuple[dict[str, Any], int, int] | None:
        """(means, steps, non-skipped steps) of the window, or None when it is empty. One host sync.

        Values average the non-skipped steps (all steps when every one was skipped)."""
        w = getattr(self, "_window", None)
        if w is None or w["n"] == 0:
            return None
        n, n_ok = w["n"], int(round(float(w["n_ok"])))
        src, div = (w["ok"], n_ok) if n_ok > 0 else (w["all"], n)
        return {k: (v / div).cpu().tolist() for k, v in src.items()}, n, n_ok

    # -- what a log reports --------------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        """The ``atax/*`` values as Python floats (one host sync): means over the optimizer steps since the
        previous log (the trainer's ``logging_steps`` window, as HF averages ``loss``). ``atax/skipped`` is the
        fraction of those steps that were skipped; the other values average the steps that were not. With
        nothing accumulated (e.g. right after a log), the latest projection's values."""
        if isinstance(getattr(self, "reference", None), ActivationSubspace):
            return self._activation_log_values()
        means = self._window_means()
        if means is not None:
            return self._window_log_values(*means)
        s = self.last_stats
        if s is None:
            return {}
        cos = s.cosines.detach().cpu().tolist()
        norms = self.last_ref_norm.detach().cpu().tolist() if self.last_ref_norm is not None else []
        out = _per_reference("cosine", cos)
        out["atax/removed_fraction"] = float(s.removed_fraction)
        out["atax/skipped"] = float(bool(s.skipped))
        if getattr(self, "log_tax_rate", False) and not bool(s.skipped):
            if len(cos) == 1:
                out["atax/tax_rate"] = float(cos[0]) ** 2
            elif self.mode == "orthogonal" and self.granularity == "global" and self.strength > 0:
                out["atax/tax_rate"] = min(1.0, (float(s.removed_fraction) / self.strength) ** 2)
        out.update(_per_reference("ref_norm", norms))
        return out

    @staticmethod
    def _window_log_values(means: dict[str, Any], n: int, n_ok: int) -> dict[str, float]:
        out = {**_per_reference("cosine", means["cosine"]), **_per_reference("ref_norm", means["ref_norm"])}
        out["atax/removed_fraction"] = float(means["removed_fraction"])
        out["atax/skipped"] = (n - n_ok) / n
        if "tax_rate" in means and n_ok > 0:
            out["atax/tax_rate"] = float(means["tax_rate"])
        return out

    def _activation_log_values(self) -> dict[str, float]:
        means = self._window_means()
        if means is not None:
            return {f"atax/{k}": float(v) for k, v in means[0].items()}
        a = getattr(self, "last_activation", None)
        if a is None:
            return {}
        out = {"atax/feature_rank_mean": float(a.feature_rank_mean),
               "atax/update_removed_fraction": float(a.update_removed_fraction)}
        if a.lora_b_rank_max is not None:
            out["atax/lora_b_rank_max"] = float(a.lora_b_rank_max)
        return out
