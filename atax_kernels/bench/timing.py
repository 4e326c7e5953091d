"""How the projection benchmark times: one call in milliseconds (CUDA events or ``perf_counter``) and the
stream-floor probe, the memory-bandwidth roofline an implementation's time is compared with."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .env import is_cuda
from .cases import Case


class Timer:
    """Times one call in ms: perf_counter on CPU, CUDA events (after syncing the setup work) on CUDA."""

    def __init__(self, device: str):
        self.cuda = is_cuda(device)

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


#: The floor probe's footprint is capped here: far beyond any last-level cache, so it still measures DRAM
#: bandwidth, without allocating the 9 GB a full-size k = 8 fp32 case would move.
FLOOR_MAX_BYTES = 1 << 30


def floor_numel(case: Case) -> int:
    """Probe elements that move the case's minimum traffic (capped at FLOOR_MAX_BYTES).

    Sized by bytes, not by the case's element count: a probe much smaller than the op's working set can sit
    in cache on small (``--quick``) cases and report a bandwidth the op can never see, and one much larger
    measures a different regime.
    """
    per_elem = (2 if is_cuda(case.device) else 3) * 4
    return max(1, min(case.min_traffic_bytes, FLOOR_MAX_BYTES) // per_elem)


class StreamFloor:
    """The memory-bandwidth roofline probe over M float32 elements.

    CPU: ``torch.add(b, c, out=a)`` (triad-like, 3 * 4 * M bytes). CUDA: device-to-device ``a.copy_(b)``
    (2 * 4 * M bytes). ``bytes_per_call / time`` is the achieved bandwidth; an op's floor time is its minimum
    traffic divided by that bandwidth.
    """

    def __init__(self, numel: int, device: str):
        self.cuda = is_cuda(device)
        self.a = torch.zeros(numel, dtype=torch.float32, device=device)  # touched: no first-write page faults
        self.b = torch.rand(numel, dtype=torch.float32, device=device)
        self.c = None if self.cuda else torch.rand(numel, dtype=torch.float32, device=device)
        self.bytes_per_call = (2 if self.cuda else 3) * 4 * numel

    def __call__(self) -> None:
        if self.cuda:
            self.a.copy_(self.b)
        else:
            torch.add(self.b, self.c, out=self.a)
