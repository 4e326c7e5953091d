"""Builders for the test case matrix: shapes, dtypes and memory layouts of gradient lists."""
from __future__ import annotations

import torch

ODD_SHAPES = [(7, 13), (1,), (0,), (3, 0, 5), (257,), (33, 3), (2, 3, 4)]
DTYPE_CONFIGS = ("fp32", "bf16", "fp16", "mixed")
LAYOUTS = ("contiguous", "noncontiguous", "misaligned", "flatbuffer")

# Relative tolerances for results rounded to a dtype (relative to vector norms).
TOL = {torch.float32: 2e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def many_shapes(count: int = 115, seed: int = 0) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 24, (count,), generator=gen).tolist()
    return [(s,) if i % 3 else (s, 2) for i, s in enumerate(sizes)]


def dtype_for(config: str, list_index: int, tensor_index: int) -> torch.dtype:
    if config == "fp32":
        return torch.float32
    if config == "bf16":
        return torch.bfloat16
    if config == "fp16":
        return torch.float16
    cycle = (torch.float32, torch.bfloat16, torch.float16)
    return cycle[(list_index + tensor_index) % 3]


def make_tensor(shape, dtype, layout, device, gen, scale=1.0) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    values = torch.randn(numel, generator=gen, dtype=torch.float64) * scale
    if layout == "contiguous":
        return values.to(dtype).view(shape).to(device)
    if layout == "misaligned":
        buf = torch.zeros(numel + 1, dtype=dtype, device=device)
        buf[1:].copy_(values.to(dtype))
        return buf[1:].view(shape)
    if layout == "noncontiguous":
        if len(shape) >= 2 and numel > 0:
            t = values.to(dtype).view(shape).to(device)
            return t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, transposed strides
        buf = torch.zeros(max(2 * numel, 1), dtype=dtype, device=device)
        view = buf[::2][:numel] if numel else buf[:0]
        view.copy_(values.to(dtype))
        return view.view(shape) if numel else view.reshape(shape)
    raise ValueError(layout)


def make_list(shapes, config, list_index, layout, device, gen, scale=1.0) -> list[torch.Tensor]:
    dtypes = [dtype_for(config, list_index, i) for i in range(len(shapes))]
    if layout == "flatbuffer":
        if len(set(dtypes)) != 1:
            dtypes = [torch.float32] * len(shapes)
        total = sum(int(torch.tensor(s).prod()) for s in shapes)
        buf = (torch.randn(total, generator=gen, dtype=torch.float64) * scale).to(dtypes[0]).to(device)
        out, pos = [], 0
        for s in shapes:
            n = int(torch.tensor(s).prod())
            out.append(buf[pos:pos + n].view(s))
            pos += n
        return out
    return [make_tensor(s, d, layout, device, gen, scale) for s, d in zip(shapes, dtypes)]


def make_problem(shapes, k, config="fp32", layout="contiguous", device="cpu", seed=0, conflict_mix=True):
    """grads and k references; grads get a random mix of the references so some dots are negative."""
    gen = torch.Generator().manual_seed(seed)
    refs = [make_list(shapes, config, j + 1, layout, device, gen) for j in range(k)]
    grads = make_list(shapes, config, 0, layout, device, gen)
    if conflict_mix:
        weights = (torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1).tolist()
        for i, g in enumerate(grads):
            mix = sum(w * refs[j][i].double() for j, w in enumerate(weights)) * 0.5 if k else 0
            g.copy_((g.double() + mix).to(g.dtype))
    return grads, refs


def output_tol(grads) -> float:
    return max((TOL[t.dtype] for t in grads), default=TOL[torch.float32])
