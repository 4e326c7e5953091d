"""The mitigations the study compares, as small parseable specs (``--methods plain,ptx:w=1,act:e=0.9``).

Grammar: ``KIND[:key=value]...``; kinds and their keys (defaults in brackets):

* ``plain``: the safety loss alone.
* ``ptx:w=λ`` [1.0]: plus λ x the LM loss of a retain batch (capability + benign train prompts with the base
  model's own answers). 1 extra forward, 1 extra backward per step.
* ``kl:w=λ`` [0.5]: plus λ x KL(tuned || base) over the answer positions of a retain batch. 2 extra forwards
  (the tuned model and the frozen base), 1 extra backward.
* ``grad[:mode=orthogonal|conflict]``: :class:`~atax_kernels.ProjectedOptimizer` with a live reference, the
  gradient of the LM loss of a retain batch, projected out of the safety gradient. 1 extra forward/backward.
* ``act:e=E:c=β:pos=all|answer`` [0.9, 0, all]: :class:`~atax_kernels.ActivationSubspace` built from retain
  train batches (``from_loader``), ``refresh()`` every ``--refresh-every`` steps, the realised update projected
  by ``ProjectedOptimizer(activation_subspace=...)``. No extra backward; the refresh forwards are amortised.
  ``mods=attn|mlp`` protects only the linear layers under an attention (a path component containing
  ``attn``) or an MLP (``mlp``) block [all: every supported module, embeddings included].
* ``act+ptx:e=E:w=λ:c=β:pos=:mods=`` [0.9, 1.0, 0, all, all]: the same bases, the safety gradient projected and the PTX
  gradient (captured with ``capture_reference``) added after, so PTX is not projected away
  (``ProjectedOptimizer(activation_subspace=..., ptx_weight=λ)``).
* ``interp:a=α`` [0.5]: the plain run's weights moved back toward the base, ``θ_base + α (θ_plain − θ_base)``
  (:func:`atax_kernels.interpolate_`); no training of its own (it needs ``plain`` in the same run, and exactly
  one ``plain``, without ``la=1``: it is made from that run's weights).

Every training kind also takes ``la=0|1`` [0]: with ``la=1`` the safety data also holds the *train* split of the
benign look-alikes ("How do I kill a Python process?") answered with the base model's own answer (SFT rows; for
DPO chosen = that answer, rejected = a refusal), mixed into the safety batches; look-alikes the base itself
refuses are left out. It teaches where the refusal boundary is, the lever aimed at over-refusal; the held-out
look-alikes are other groups, never trained on. Not with contrast ``c > 0`` (the safety side would include them).
``la=nll``: the same answers as NLL rows beside the objective's loss (a look-alike row's loss is the mean token
NLL of its answer; for SFT that is what ``la=1`` does), so DPO never sees a refusal on the rejected side.
Measured on SmolLM2-135M-Instruct (lr 3e-5): on SFT it lowered over-refusal for every method (act e0.9, 3 seeds:
0.57 -> 0.36 at 0.98 safety); on DPO the pairs against a refusal erased the safety being learned (README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Method", "parse_method", "parse_methods", "QUICK_METHODS", "FULL_METHODS", "KINDS", "FAMILY"]

KINDS = ("plain", "ptx", "kl", "grad", "act", "act+ptx", "interp")
#: Colour family of each kind in the plot.
FAMILY = {"plain": "plain", "interp": "plain", "ptx": "ptx", "kl": "kl", "grad": "grad", "act": "act",
          "act+ptx": "act+ptx"}
_KEYS = {
    "plain": {"la": "0"},
    "ptx": {"w": 1.0, "la": "0"},
    "kl": {"w": 0.5, "la": "0"},
    "grad": {"mode": "orthogonal", "la": "0"},
    "act": {"e": 0.9, "c": 0.0, "pos": "all", "mods": "all", "la": "0"},
    "act+ptx": {"e": 0.9, "w": 1.0, "c": 0.0, "pos": "all", "mods": "all", "la": "0"},
    "interp": {"a": 0.5},
}
_CHOICES = {"mode": ("orthogonal", "conflict"), "pos": ("all", "answer", "prompt"), "mods": ("all", "attn", "mlp"),
            "la": ("0", "1", "nll")}
#: Keys added after rows were committed, left out of ``spec`` at their default so those rows still resume.
_QUIET_DEFAULTS = {"mods": "all", "la": "0"}

#: The quick tier (``make demo``, <= 15 min on 2 cores): plain and its free interpolation, PTX, activation projection
#: alone and with PTX. Gradient projection (grad) is in the full tier: on SmolLM2 it removed ~3 % and ended like
#: plain, at the cost of a PTX step (add it with --methods).
QUICK_METHODS = "plain,interp:a=0.5,ptx:w=1,act:e=0.9,act+ptx:e=0.9:w=1"
#: The full tier (the seeds study): the quick tier's methods over 3 seeds x 2 learning rates x SFT and DPO, so
#: its rows extend the quick table. The other dials (PTX 0.3/3, interpolation 0.25/0.75, KL, gradient space,
#: energy 0.99, contrast) are one --methods away; on 2 CPU cores each extra method costs ~1 h over this grid.
FULL_METHODS = QUICK_METHODS


@dataclass(frozen=True)
class Method:
    """One parsed method spec (see the module docstring)."""

    kind: str
    params: tuple[tuple[str, object], ...] = field(default=())

    def get(self, key: str) -> object:
        return dict(self.params)[key]

    @property
    def name(self) -> str:
        """A short label: ``plain``, ``ptx 1``, ``act e0.9``, ``act e0.9 c0.5 + ptx 1``, ``interp 0.5``,
        ``act e0.9 + look-alikes``."""
        suffix = {"0": "", "1": " + look-alikes", "nll": " + look-alikes (NLL)"}[self.lookalikes]
        return self._base_name() + suffix

    @property
    def lookalikes(self) -> str:
        """How the train look-alikes join the safety data: ``"0"`` not at all, ``"1"`` as the objective's own
        rows (SFT rows, DPO pairs against a refusal), ``"nll"`` as answer-NLL rows beside any objective."""
        return str(dict(self.params).get("la", "0"))

    @property
    def answers_lookalikes(self) -> bool:
        """``la=1`` or ``la=nll``: the safety data also teaches the base's answers to the train look-alikes."""
        return self.lookalikes != "0"

    def _base_name(self) -> str:
        p = dict(self.params)
        if self.kind == "plain":
            return "plain"
        if self.kind in ("ptx", "kl"):
            return f"{self.kind} {p['w']:g}"
        if self.kind == "grad":
            return "grad" if p["mode"] == "orthogonal" else f"grad {p['mode']}"
        if self.kind == "interp":
            return f"interp {p['a']:g}"
        s = f"act e{p['e']:g}"
        if p["c"]:
            s += f" c{p['c']:g}"
        if p["pos"] != "all":
            s += f" {p['pos']}"
        if p.get("mods", "all") != "all":
            s += f" {p['mods']} only"
        if self.kind == "act+ptx":
            s += f" + ptx {p['w']:g}"
        return s

    @property
    def family(self) -> str:
        return FAMILY[self.kind]

    @property
    def trains(self) -> bool:
        return self.kind != "interp"

    @property
    def spec(self) -> str:
        return ":".join([self.kind] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params
                                       if _QUIET_DEFAULTS.get(k, object()) != v])


def parse_method(text: str) -> Method:
    """Parse one spec; ``ValueError`` naming the bad part."""
    parts = [t.strip() for t in str(text).strip().split(":")]
    kind = parts[0]
    if kind not in _KEYS:
        raise ValueError(f"unknown method {kind!r} in {text!r}; known: {', '.join(KINDS)}")
    params = dict(_KEYS[kind])
    for part in parts[1:]:
        if "=" not in part:
            raise ValueError(f"method {text!r}: {part!r} is not key=value (keys of {kind}: "
                             f"{', '.join(_KEYS[kind]) or 'none'})")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in params:
            raise ValueError(f"method {text!r}: unknown key {key!r} (keys of {kind}: {', '.join(_KEYS[kind]) or 'none'})")
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"method {text!r}: {key} must be one of {_CHOICES[key]}, got {value!r}")
            params[key] = value
            continue
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"method {text!r}: {key}={value!r} is not a number") from None
        if key == "e" and not 0.0 <= v <= 1.0:
            raise ValueError(f"method {text!r}: energy e must be in [0, 1], got {v}")
        if key in ("w", "c") and not v >= 0.0:
            raise ValueError(f"method {text!r}: {key} must be >= 0, got {v}")
        if kind in ("ptx", "kl", "act+ptx") and key == "w" and not v > 0.0:
            raise ValueError(f"method {text!r}: the weight w must be > 0")
        params[key] = v
    if params.get("la", "0") != "0" and params.get("c"):
        raise ValueError(f"method {text!r}: la={params['la']} with contrast c > 0 would observe the answered look-alikes as the "
                         f"safety side and subtract benign directions from the protected span; use one of them")
    return Method(kind, tuple(params.items()))


def parse_methods(text: str) -> list[Method]:
    """Parse a comma-separated list; duplicates refused; ``interp`` needs ``plain`` (added first if missing)."""
    methods = [parse_method(t) for t in str(text).split(",") if t.strip()]
    if not methods:
        raise ValueError("no method given")
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method(s) given twice: {', '.join(dup)}")
    if any(m.kind == "interp" for m in methods) and not any(m.kind == "plain" for m in methods):
        methods.insert(0, parse_method("plain"))
    if any(m.kind == "interp" for m in methods):
        plains = [m for m in methods if m.kind == "plain"]
        if len(plains) > 1:
            raise ValueError("interp is made from the plain run's weights, and more than one plain run is given "
                             f"({', '.join(m.name for m in plains)}): give one plain with interp")
        if plains[0].answers_lookalikes:
            raise ValueError("interp is made from the plain run's weights and its rows are labelled as made from "
                             "plain: give interp with plain (la=0), not with plain:la=1 or la=nll")
    # plain first, its interpolations right after: they are made from its weights (then freed)
    methods.sort(key=lambda m: {"plain": 0, "interp": 1}.get(m.kind, 2))
    return methods
