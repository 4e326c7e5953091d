"""The benchmark's workloads: the dtypes by name, the GPT-2-small parameter shapes, a ``Case`` (model, dtype,
reference count, scale, device) and its seeded gradients and references."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def gpt2_small_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of GPT-2 small (HF layout, tied lm_head: 124,439,808 parameters in 148 tensors).

    ``scale`` < 1 shrinks the first dimension of every 2-D tensor (vocab rows, positions, and the input dim of
    every Conv1D weight) to ``max(1, round(rows * scale))``; 1-D tensors (biases, layer norms) keep their size.
    The tensor count (148) stays the same, so per-tensor overheads keep their weight; N scales ~linearly.
    """
    if not (0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    d, vocab, positions, layers = 768, 50257, 1024, 12

    def rows(r: int) -> int:
        return max(1, int(round(r * scale)))

    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("wte.weight", (rows(vocab), d)),
        ("wpe.weight", (rows(positions), d)),
    ]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (rows(d), 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (rows(d), d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (rows(d), 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (rows(4 * d), d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


GPT2_SMALL_NUMEL = sum(math.prod(s) for _, s in gpt2_small_shapes(1.0))  # 124,439,808


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark workload: ``k`` references on the ``scale``-shrunk GPT-2-small shapes in ``dtype``."""

    model: str
    dtype: str  # key of DTYPES
    k: int
    scale: float
    device: str

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return gpt2_small_shapes(self.scale)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def min_traffic_bytes(self) -> int:
        # read g, write g, and (for the two passes) read g again; each reference read twice:
        # N * (3 s_g + 2 k s_r), the roofline in docs/DESIGN.md.
        s = self.elem_size
        return self.numel * (3 * s + 2 * self.k * s)

    @property
    def name(self) -> str:
        return f"{self.model} {self.dtype} k={self.k}"


def make_data(case: Case, seed: int = 0) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Gradients and k reference lists with a large component of g inside span(refs).

    g = noise + sum_j r_j (all i.i.d. N(0, 0.01^2) per element), so the orthogonal projection removes more than
    half of ||g||: an implementation that does nothing (or the wrong thing) fails the check against the seed.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    grads: list[Tensor] = []
    refs: list[list[Tensor]] = [[] for _ in range(case.k)]
    for _, shape in case.shapes:
        g = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.01)
        for j in range(case.k):
            r = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.01)
            g.add_(r)
            refs[j].append(r.to(device=dev, dtype=dtype))
        grads.append(g.to(device=dev, dtype=dtype))
        del g
    return grads, refs

