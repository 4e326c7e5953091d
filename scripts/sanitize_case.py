"""Small gram / combine_ workload for compute-sanitizer (memcheck, racecheck) on the CUDA kernels.

Covers: fp32/bf16/fp16 and mixed lists, misaligned views (storage offset 1), non-contiguous
tensors, zero-size tensors, many small tensors sharing chunks, a multi-chunk tensor, m <= 8 (register
path) and m > 8 (shared-memory path), global and per-tensor coefficients with zeros.
Both backends by default (``--backend cuda|triton|all``): the CUDA ops ``atax::`` and the Triton ops
``atax_triton::`` (every kernel name contains "atax", which gpu_check.sh's ``--kernel-name kns=atax`` keeps).
Exit status 0 when the results match a float64 oracle.
"""
from __future__ import annotations

import sys

import torch


def main(argv: list[str]) -> int:
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "all"
    if not torch.cuda.is_available():
        print("sanitize_case: no CUDA device", file=sys.stderr)
        return 1
    ok = True
    if backend in ("cuda", "all"):
        from atax_kernels import _ext

        _ext.load()
        if not torch._C._dispatch_has_kernel_for_dispatch_key("atax::gram", "CUDA"):
            print(f"sanitize_case: atax CUDA kernels not built: {_ext.build_info()}", file=sys.stderr)
            return 1
        ok &= run(torch.ops.atax, "cuda")
    if backend in ("triton", "all"):
        import atax_kernels.ops.triton as tb

        if not tb.available(torch.device("cuda")):
            print(f"sanitize_case: triton backend unavailable: {tb._error!r}", file=sys.stderr)
            return 1
        ok &= run(torch.ops.atax_triton, "triton")
    print("sanitize_case:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def run(ops, label: str) -> bool:
    torch.manual_seed(0)
    dev = "cuda"
    dts = [torch.float32, torch.bfloat16, torch.float16]
    shapes = [(3, 5), (0,), (70_001,), (129,), (2, 0)] + [((i * 13) % 97 + 1,) for i in range(40)]

    def make(i, j):
        dt = dts[(i + j) % 3]
        s = shapes[i]
        numel = 1
        for d in s:
            numel *= d
        if (i + j) % 4 == 1:  # misaligned view
            return torch.randn(numel + 1, device=dev).to(dt)[1:].view(s)
        if (i + j) % 4 == 2 and len(s) == 1 and numel > 1:  # non-contiguous view
            return torch.randn(numel, 2, device=dev).to(dt)[:, 0]
        return torch.randn(s, device=dev).to(dt)

    ok = True
    for m in (3, 10):
        vecs = [[make(i, j) for i in range(len(shapes))] for j in range(m)]
        flat = [t for lst in vecs for t in lst]
        for per_tensor in (False, True):
            out = ops.gram(flat, m, per_tensor)
            rows = [torch.stack([vecs[j][i].reshape(-1).double() for j in range(m)])
                    for i in range(len(shapes))]
            per = torch.stack([r @ r.T for r in rows])
            ref = per if per_tensor else per.sum(0)
            err = (out - ref).abs().max().item()
            scale = ref.abs().max().item() + 1.0
            ok &= err <= 1e-4 * scale
            print(f"{label} gram m={m} per_tensor={per_tensor}: max abs err {err:.3e}")
    k = 3
    target = [make(i, 5) for i in range(len(shapes))]
    vecs = [[make(i, j) for i in range(len(shapes))] for j in range(k)]
    flat = [t for lst in vecs for t in lst]
    for coefs in (torch.tensor([0.5, 0.0, -1.25], dtype=torch.float64),
                  torch.randn(len(shapes), k, dtype=torch.float64).masked_fill(
                      torch.rand(len(shapes), k) < 0.3, 0.0)):
        before = [t.double() for t in target]
        ops.combine_(target, flat, coefs.to(dev))
        c = coefs
        worst = 0.0
        for i in range(len(shapes)):
            row = c[i] if c.dim() == 2 else c
            ref = before[i].clone()
            for j in range(k):
                if float(row[j]) != 0.0:
                    ref -= float(row[j]) * vecs[j][i].double()
            if ref.numel():
                worst = max(worst, ((target[i].double() - ref).abs() / (ref.abs() + 1.0)).max().item())
        ok &= worst <= 2e-2  # bf16/fp16 targets: one rounding
        print(f"{label} combine_ coefs{tuple(coefs.shape)}: max rel err {worst:.3e}")
    torch.cuda.synchronize()
    return bool(ok)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
