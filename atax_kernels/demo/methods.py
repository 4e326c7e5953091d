"""The demo's methods: one :class:`Method` per mitigation (the keyword arguments of
``ArithmeticTask.finetune_safety``, or the interpolation of the plain run), and the learning rates they run at."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
QUICK_LRS = (3e-4, 1e-3)
INTERP_ALPHAS = (0.25, 0.5, 0.75)


@dataclass
class Method:
    """One mitigation: keyword arguments for ``ArithmeticTask.finetune_safety`` (or an interpolation)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    dial: float | None = None  # the value of the knob that trades safety for capability within a family


def methods(quick: bool = False, full: bool = False) -> list[Method]:
    """The demo's methods: ``quick`` is the CI size, ``full`` adds the slower gradient variants."""
    tempered = dict(method="projected", reference="tempered", temperature=30.0, n_refs=4)
    out = [
        Method("plain", dict(method="plain"), "ptx", 0.0),
        Method("ptx 0.1", dict(method="ptx", ptx_weight=0.1), "ptx", 0.1),
        Method("ptx 1.0", dict(method="ptx", ptx_weight=1.0), "ptx", 1.0),
        Method("kl 0.5", dict(method="kl", kl_weight=0.5), "kl", 0.5),
        Method("interp", {}, "interp"),
        Method("grad: loss ref", dict(method="projected", reference="loss", n_refs=1), "grad"),
        Method("grad: 4 tempered (update)", dict(tempered, target="update"), "grad"),
    ]
    if full:
        out += [
            Method("grad: conflict", dict(tempered, target="update", mode="conflict"), "grad"),
            Method("grad: tempered + ptx 0.1", dict(tempered, target="grad", ptx_weight=0.1), "grad"),
        ]
    for ptx in (0.0, 1.0):
        for contrast in (0.0, 1.0):
            for energy in (0.9, 0.99):
                name = f"act e{energy:g} c{contrast:g}" + (" + ptx 1.0" if ptx else "")
                out.append(Method(name, dict(method="activation", energy=energy, contrast=contrast, ptx_weight=ptx),
                                  f"act c{contrast:g}" + (" + ptx" if ptx else ""), energy))
    if quick:
        keep = {"plain", "ptx 1.0", "interp", "grad: loss ref", "act e0.99 c0", "act e0.9 c1 + ptx 1.0"}
        out = [m for m in out if m.name in keep]
    return out
