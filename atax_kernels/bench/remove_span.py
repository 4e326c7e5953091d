"""Benchmark of ``ops.remove_span_`` (ΔW <- ΔW - (ΔW U) Uᵀ for every protected weight, one call per model).

``python -m atax_kernels.bench.remove_span`` (or ``python -m atax_kernels.bench remove-span``). Side by side in
one process, interleaved round-robin (the machine is shared and noisy): two ``torch.matmul`` per module (what a
user writes: ``T = W @ U; W -= T @ U.T``, U cast to W's dtype), each atax backend, and the roofline
max(bytes / bandwidth, flops / matmul rate), where bandwidth is a ``torch.add(b, c, out=a)`` triad and the
matmul rate a large fp32 ``torch.matmul``, both measured before every round of the same run.

Module sets: GPT-2 small (12 layers of c_attn 768->2304, attn c_proj 768->768, c_fc 768->3072, mlp c_proj
3072->768, Conv1D layout: ΔW is the ``.t()`` view of a [d_in, d_out] weight) and a Llama-2-7B-shaped set
(q/k/v/o 4096->4096, gate/up 4096->11008, down 11008->4096; ``--llama-layers`` of them, 2 by default:
``--llama-layers 32`` is the full model). One basis per distinct layer input (q/k/v share one, gate/up share
one, as ActivationSubspace builds them); r is clipped to d_in. Bases are fp32.

Minimum traffic: every ΔW read and written once plus every distinct basis read once:
Σ 2·d_out·d_in·s_w + Σ d_in·r·4 bytes. Flops: Σ 4·d_out·d_in·r.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._cli import add_device_flag, add_dtype_flag, add_report_flags, add_threads_flag
from .env import environment, header_lines
from .cases import DTYPES


@dataclass
class ModuleSet:
    """Targets [d_out, d_in] (with their layout) and the index of the basis each one uses."""

    name: str
    shapes: list[tuple[int, int]]
    basis_of: list[int]  # index into the distinct inputs
    inputs: list[int]  # d_in of each distinct input
    conv1d: bool  # True: ΔW is the .t() view of a [d_in, d_out] weight (GPT-2 Conv1D)


def gpt2_small(layers: int = 12, div: int = 1) -> ModuleSet:
    d, f = 768 // div, 3072 // div
    shapes, basis_of, inputs = [], [], []
    for _ in range(layers):
        b = len(inputs)
        inputs += [d, d, d, f]  # ln_1 output, attention output, ln_2 output, gelu output
        shapes += [(3 * d, d), (d, d), (f, d), (d, f)]
        basis_of += [b, b + 1, b + 2, b + 3]
    return ModuleSet("gpt2-small", shapes, basis_of, inputs, conv1d=True)


def llama(layers: int = 2, div: int = 1) -> ModuleSet:
    d, f = 4096 // div, 11008 // div
    shapes, basis_of, inputs = [], [], []
    for _ in range(layers):
        b = len(inputs)
        inputs += [d, d, d, f]  # input_layernorm output, attention output, post_attention_layernorm output, act*up
        shapes += [(d, d)] * 3 + [(d, d)] + [(f, d)] * 2 + [(d, f)]
        basis_of += [b, b, b, b + 1, b + 2, b + 2, b + 3]
    return ModuleSet(f"llama-7b x{layers} layers", shapes, basis_of, inputs, conv1d=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


class Probes:
    """Stream bandwidth (triad) and fp32 matmul rate, measured again before every round."""

    def __init__(self, device: torch.device, triad_elems: int, mm_n: int):
        self.device = device
        self.a = torch.empty(triad_elems, device=device)
        self.b = torch.randn(triad_elems, device=device)
        self.c = torch.randn(triad_elems, device=device)
        self.x = torch.randn(mm_n, mm_n, device=device)
        self.y = torch.randn(mm_n, mm_n, device=device)
        self.bw: list[float] = []
        self.rate: list[float] = []
        self.round()  # warm both

    def round(self) -> None:
        dt = _time(lambda: torch.add(self.b, self.c, out=self.a), self.device)
        self.bw.append(3 * self.a.numel() * 4 / dt)
        dt = _time(lambda: torch.matmul(self.x, self.y), self.device)
        self.rate.append(2 * self.x.shape[0] ** 3 / dt)

    def best(self) -> tuple[float, float]:
        # the roofline uses the best the machine showed in this run (a roofline is a bound, not a median)
        return max(self.bw), max(self.rate)


def _make(ms: ModuleSet, dtype: torch.dtype, r: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bases = []
    for d_in in ms.inputs:
        rr = min(r, d_in)
        q = torch.linalg.qr(torch.randn(d_in, rr, generator=gen))[0]
        bases.append(q.to(device).contiguous())
    targets = []
    for d_out, d_in in ms.shapes:
        w = torch.empty((d_in, d_out) if ms.conv1d else (d_out, d_in), dtype=dtype, device=device)
        w.normal_(0, 0.02)
        targets.append(w.t() if ms.conv1d else w)
    return targets, [bases[b] for b in ms.basis_of], bases


def _traffic(ms: ModuleSet, dtype: torch.dtype, r: int) -> tuple[float, float]:
    s = torch.empty(0, dtype=dtype).element_size()
    nbytes = sum(2 * o * i * s for o, i in ms.shapes) + sum(i * min(r, i) * 4 for i in ms.inputs)
    flops = sum(4 * o * i * min(r, i) for o, i in ms.shapes)
    return float(nbytes), float(flops)


def torch_matmul(targets: list[torch.Tensor], bases: list[torch.Tensor]) -> None:
    """The baseline: two torch.matmul per module, in the target's dtype."""
    cast: dict[int, torch.Tensor] = {}
    for w, u in zip(targets, bases):
        key = id(u)
        if key not in cast:
            cast[key] = u.to(w.dtype)
        uw = cast[key]
        t = torch.matmul(w, uw)
        w.sub_(torch.matmul(t, uw.t()))


def _check_error(impl: Callable, ms: ModuleSet, dtype: torch.dtype, r: int, device: torch.device) -> float:
    """Max over two modules of ‖result - float64 oracle‖ / ‖ΔW‖ (first and last module of the set)."""
    first, last = 0, len(ms.shapes) - 1
    sub = ModuleSet(ms.name, [ms.shapes[first], ms.shapes[last]], [0, 1],
                    [ms.inputs[ms.basis_of[first]], ms.inputs[ms.basis_of[last]]], ms.conv1d)
    ts, us, _ = _make(sub, dtype, r, device, seed=1)
    refs = []
    for w, u in zip(ts, us):
        w64, u64 = w.double(), u.double()
        refs.append((w64 - (w64 @ u64) @ u64.T, float(w64.norm())))
    impl(ts, us)
    return max(float((w.double() - ref).norm()) / max(norm, 1e-30) for w, (ref, norm) in zip(ts, refs))


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    from .. import ops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        avail = ops.available_backends()
        # on CPU the triton backend is the interpreter; on CUDA 'cuda' is the torch path (no kernel of its own)
        backends = [b for b in avail if b in (("torch", "cpu") if device.type == "cpu" else ("torch", "triton"))]
    impls: dict[str, Callable] = {"torch.matmul x2": torch_matmul}
    for b in backends:
        impls[f"atax[{b}]"] = (lambda bk: (lambda t, u: ops.remove_span_(t, u, backend=bk)))(b)

    sets = []
    if "gpt2" in args.models:
        sets.append(gpt2_small(args.gpt2_layers, args.div))
    if "llama" in args.models:
        sets.append(llama(args.llama_layers, args.div))
    ranks = [int(x) for x in args.ranks.split(",")]
    dtypes = [d.strip() for d in args.dtype.split(",")]
    probes = Probes(device, args.triad_elems, args.mm_n)
    records = []
    for ms in sets:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for r in ranks:
                targets, bases, _ = _make(ms, dtype, r, device)
                nbytes, flops = _traffic(ms, dtype, r)
                errs = {name: _check_error(fn, ms, dtype, r, device) for name, fn in impls.items()}
                times: dict[str, list[float]] = {name: [] for name in impls}
                for name, fn in impls.items():  # warm-up (first-call costs are not kernel time)
                    _time(lambda: fn(targets, bases), device)
                for _ in range(args.repeat):
                    probes.round()
                    for name, fn in impls.items():
                        times[name].append(_time(lambda: fn(targets, bases), device))
                bw, rate = probes.best()
                roof = max(nbytes / bw, flops / rate)
                base_ms = min(times["torch.matmul x2"]) * 1e3
                for name in impls:
                    best = min(times[name]) * 1e3
                    rec = {
                        "set": ms.name, "dtype": dname, "r": r, "impl": name,
                        "ms_min": best, "ms_median": statistics.median(times[name]) * 1e3,
                        "roofline_ms": roof * 1e3, "bound": "memory" if nbytes / bw >= flops / rate else "matmul",
                        "x_roofline": best / (roof * 1e3), "x_matmul": best / base_ms, "rel_err": errs[name],
                        "bytes": nbytes, "flops": flops,
                    }
                    records.append(rec)
                    if not args.no_progress:
                        print(f"{ms.name:22s} {dname} r={r:<5d} {name:18s} {best:10.2f} ms  x{rec['x_roofline']:.2f} "
                              f"roofline ({rec['bound']})  x{rec['x_matmul']:.2f} matmul  err {errs[name]:.1e}",
                              file=sys.stderr, flush=True)
                del targets, bases
    bw, rate = probes.best()
    probe = {
        "bandwidth_GBps_best": bw / 1e9, "bandwidth_GBps_median": statistics.median(probes.bw) / 1e9,
        "matmul_GFLOPs_best": rate / 1e9, "matmul_GFLOPs_median": statistics.median(probes.rate) / 1e9,
        "triad_elems": args.triad_elems, "mm_n": args.mm_n,
    }
    return records, probe


def format_table(records: list[dict]) -> str:
    lines = ["| module set | dtype | r | impl | ms (min) | ms (median) | roofline ms (bound) | x roofline "
             "| x torch.matmul | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        lines.append(
            f"| {rec['set']} | {rec['dtype']} | {rec['r']} | {rec['impl']} | {rec['ms_min']:.2f} | "
            f"{rec['ms_median']:.2f} | {rec['roofline_ms']:.2f} ({rec['bound']}) | {rec['x_roofline']:.2f} | "
            f"{rec['x_matmul']:.2f} | {rec['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def markdown_report(env: dict, probe: dict, records: list[dict], wall_s: float) -> str:
    head = [
        "# atax_kernels remove_span_ benchmark (activation-space projection)",
        "",
        *header_lines(env, wall_s, with_atax_version=False),
        f"- stream triad: best {probe['bandwidth_GBps_best']:.1f} GB/s (median {probe['bandwidth_GBps_median']:.1f}) "
        f"over {probe['triad_elems']:,} fp32 elements; fp32 matmul {probe['mm_n']}^3: best "
        f"{probe['matmul_GFLOPs_best']:.1f} GFLOP/s (median {probe['matmul_GFLOPs_median']:.1f})",
        "",
        "Columns: min and median over the repeats, every implementation once per round, round-robin, a triad and "
        "a matmul probe before every round; roofline = max(bytes / best triad bandwidth, flops / best matmul rate) "
        "with bytes = every ΔW read and written once + every distinct basis read once, flops = 4·d_out·d_in·r; "
        "x torch.matmul = min time / min time of two torch.matmul per module (in the target's dtype); rel err = "
        "‖result − float64 oracle‖ / ‖ΔW‖ on the first and last module. r is clipped to d_in.",
        "",
        "",
    ]
    return "\n".join(head) + format_table(records) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atax_kernels.bench remove-span", description=__doc__.split("\n")[0]
                                + " List-valued flags take comma-separated lists.")
    add_device_flag(p)
    p.add_argument("--models", default="gpt2,llama", help="comma list of gpt2,llama (default both)")
    p.add_argument("--gpt2-layers", type=int, default=12, help="GPT-2 small layers (default 12)")
    p.add_argument("--llama-layers", type=int, default=None,
                   help="Llama-7B-shaped layers (default 2 on CPU, 8 on CUDA; 32 = the full model)")
    p.add_argument("--div", type=int, default=1, help="divide every width by this (tiny runs for tests)")
    p.add_argument("--ranks", default="16,128,1024", help="comma list of r (default 16,128,1024)")
    add_dtype_flag(p)
    p.add_argument("--backends", default=None, help="comma list of atax backends (default: the device's kernels)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3); the tables report the min")
    add_threads_flag(p)
    p.add_argument("--triad-elems", type=int, default=None, help="triad length (default 2^25 CPU, 2^28 CUDA)")
    p.add_argument("--mm-n", type=int, default=None, help="matmul probe size (default 2048 CPU, 8192 CUDA)")
    add_report_flags(p, json_help="write records + environment as JSON", markdown_help="write the markdown report")
    p.add_argument("--no-progress", action="store_true", help="no per-row lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atax_kernels.bench remove-span [flags]``: run, print the table, write the reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if args.llama_layers is None:
        args.llama_layers = 8 if cuda else 2
    if args.triad_elems is None:
        args.triad_elems = max(1 << 12, (1 << (28 if cuda else 25)) // (args.div * args.div))
    if args.mm_n is None:
        args.mm_n = max(64, (8192 if cuda else 2048) // args.div)
    for d in args.dtype.split(","):
        if d.strip() not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    env = environment(args.device, argv)  # before the run: the commit that was measured
    t0 = time.perf_counter()
    records, probe = run(args)
    wall = time.perf_counter() - t0
    env["command"] = " ".join([os.path.basename(sys.executable), "-m", "atax_kernels.bench.remove_span", *argv])
    print(f"stream triad best {probe['bandwidth_GBps_best']:.1f} GB/s, fp32 matmul best "
          f"{probe['matmul_GFLOPs_best']:.1f} GFLOP/s; wall {wall:.1f} s")
    print(format_table(records))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown_report(env, probe, records, wall))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "probe": probe, "records": records}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
