"""GPU bandwidth check of ``project_``: time per call as a fraction of the measured device copy bandwidth.

Cases: GPT-2 small (148 tensors, 124 M parameters) and Llama-7B-shaped lists (the real tensor shapes:
embedding, per layer q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008, two norms; final norm, lm_head),
bf16, k = 1 and 4, orthogonal mode, global granularity. ``--llama-layers`` keeps the first L of the 32 layers
(every tensor keeps its shape, so per-tensor overheads and chunk tables stay representative; quick: 2, full: 8).

Copy bandwidth: ``dst.copy_(src)`` of a 2 GiB buffer (read + write counted). An op's bandwidth is its minimum
traffic N (3 s_g + 2 k s_r) over its time; ``fraction`` = bandwidth / copy bandwidth (1.0 = streams like a copy).

No memory-measurement subprocesses (``python -m atax_kernels.bench`` has them). Only torch and the standard
library; runs on CPU too (``--tiny``: tiny shapes, used by the dry run in CI).

    python3 scripts/gpu_bench.py --device cuda --tier full --json OUT.json --markdown OUT.md
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def llama7b_shapes(layers: int, shrink: int = 1) -> list[tuple[int, ...]]:
    """Llama-7B parameter shapes (first ``layers`` layers); ``shrink`` divides every dimension (tests only)."""
    d, f, v = 4096 // shrink, 11008 // shrink, 32000 // shrink
    shapes: list[tuple[int, ...]] = [(v, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
    return shapes + [(d,), (v, d)]


def gpt2_shapes(scale: float) -> list[tuple[int, ...]]:
    from atax_kernels.bench.cases import gpt2_small_shapes

    return [s for _, s in gpt2_small_shapes(scale)]


class Clock:
    """Median of repeated timed calls; one call is timed by the benchmark's own Timer (CUDA events on GPU)."""

    def __init__(self, device: torch.device):
        from atax_kernels.bench.timing import Timer

        self._timer = Timer(str(device))

    def ms(self, fn, repeat: int) -> float:
        """Median of ``repeat`` timed calls."""
        return statistics.median(self._timer(fn) for _ in range(repeat))


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int) -> float:
    """Bytes/s of a device-to-device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.zeros_like(src)
    clock = Clock(device)
    for _ in range(2):
        dst.copy_(src)
    ms = clock.ms(lambda: dst.copy_(src), repeat)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def run(args: argparse.Namespace) -> dict:
    import atax_kernels
    from atax_kernels.ops.registry import _supports_device

    device = torch.device(args.device)
    dtype = torch.bfloat16
    tiny = args.tiny
    layers = args.llama_layers if args.llama_layers is not None else (2 if args.tier == "quick" else 8)
    if tiny:
        cases = {"GPT-2 small (scale 0.01)": gpt2_shapes(0.01),
                 "Llama-7B shapes (1/32 layers, dims / 64)": llama7b_shapes(1, 64)}
    else:
        cases = {"GPT-2 small": gpt2_shapes(1.0), f"Llama-7B shapes ({layers}/32 layers)": llama7b_shapes(layers)}
    ks = [int(k) for k in args.k.split(",")]
    backends = [b for b in (args.backends.split(",") if args.backends else atax_kernels.available_backends())
                if _supports_device(b, device)]
    if device.type == "cuda":
        backends = [b for b in backends if b != "cpu"]
    repeat = args.repeat if args.repeat is not None else (2 if tiny else 5 if args.tier == "quick" else 10)
    copy_bytes = (1 << 20) if tiny else (2 << 30)
    copy_bps = copy_bandwidth(device, copy_bytes, repeat)
    clock = Clock(device)
    records = []
    gen = torch.Generator(device=device).manual_seed(0)
    for cname, shapes in cases.items():
        numel = sum(math.prod(s) for s in shapes)
        for k in ks:
            grads = [torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype) for s in shapes]
            refs = [[torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype) for s in shapes]
                    for _ in range(k)]
            es = grads[0].element_size()
            traffic = numel * (3 * es + 2 * k * es)
            for b in backends:
                r = refs[0] if k == 1 else refs

                def call():
                    atax_kernels.project_(grads, r, backend=b)

                try:
                    call()  # compile / build tables
                    call()
                    ms = clock.ms(call, repeat)
                    err = None
                except Exception as e:  # a failing backend is reported, the others still run
                    ms, err = float("nan"), f"{type(e).__name__}: {e}"[:300]
                gbps = traffic / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
                rec = dict(case=cname, k=k, backend=b, dtype="bf16", numel=numel, tensors=len(shapes),
                           ms=ms, gbps=gbps, fraction=gbps * 1e9 / copy_bps, error=err)
                records.append(rec)
                print(f"[gpu_bench] {cname} k={k} {b}: {ms:.3f} ms, {gbps:.0f} GB/s, "
                      f"{rec['fraction']:.2f} of copy" + (f" ERROR {err}" if err else ""), flush=True)
            del grads, refs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                copy_gbps=copy_bps / 1e9, repeat=repeat, tier=args.tier, tiny=tiny, records=records)


def markdown(res: dict) -> str:
    lines = [f"## project_ bandwidth on {res['gpu']} (bf16, orthogonal, global)", "",
             f"Device copy bandwidth: {res['copy_gbps']:.0f} GB/s (read + write). fraction = minimum traffic "
             f"N(3 s_g + 2 k s_r) / time / copy bandwidth; median of {res['repeat']} calls.", "",
             "| case | tensors | N | k | backend | ms | GB/s | fraction |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in res["records"]:
        lines.append(f"| {r['case']} | {r['tensors']} | {r['numel']:,} | {r['k']} | {r['backend']} | "
                     f"{r['ms']:.3f} | {r['gbps']:.0f} | {r['fraction']:.2f} |"
                     + (f" error: {r['error']}" if r["error"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tier", choices=["quick", "full"], default="full")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU rehearsal)")
    p.add_argument("--k", default="1,4")
    p.add_argument("--backends", default=None, help="comma list (default: every available one for the device)")
    p.add_argument("--llama-layers", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("[gpu_bench] no CUDA device", file=sys.stderr)
        return 2
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n" + md)
    print(md)
    return 1 if any(r["error"] for r in res["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())
