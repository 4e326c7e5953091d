"""Time the Triton chunk-table build for Llama-7B and Llama-70B parameter lists without allocating them.

A table needs sizes and addresses, not data: fake 16-byte aligned addresses laid out like a list of separate
allocations are enough (``_table._build``). Reported: the median build time (numpy layout + packing + the
host tensor; on CPU no upload), the table's size, the chunk and span counts. k = 1 (2 lists) and k = 4 (5).

    python scripts/bench_table.py [--repeat 7]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # import the Triton package on a machine without a GPU
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def llama_shapes(d: int, ffn: int, layers: int, kv: int, vocab: int = 32000) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


MODELS = {
    "Llama-7B": llama_shapes(4096, 11008, 32, 4096),
    "Llama-70B": llama_shapes(8192, 28672, 80, 1024),  # GQA: 8 KV heads of 128
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    import importlib

    _table = importlib.import_module("atax_kernels.ops.triton._table")
    dev = torch.device("cpu")
    base = _table.anchor(dev).data_ptr()
    print("| model | tensors | parameters | lists | chunks | spans | table KiB | build ms (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, shapes in MODELS.items():
        numels = [math.prod(s) for s in shapes]
        for lists in (2, 5):
            ptrs, addr = [], base + (1 << 40)
            for _ in range(lists):
                for ne in numels:
                    ptrs.append(addr)
                    addr += -(-ne * 2 // 512) * 512  # bf16, 512-byte allocator granularity
            dts = [2] * len(ptrs)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                tab = _table._build(dev, False, ptrs, dts, numels)
                times.append((time.perf_counter() - t0) * 1e3)
            kib = (tab.first.untyped_storage().nbytes()) / 1024
            print(f"| {name} | {len(shapes)} | {sum(numels):,} | {lists} | {tab.n_chunks:,} | "
                  f"{tab.spans.shape[0]:,} | {kib:.0f} | {statistics.median(times):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
