"""GPU habits, checked on CPU with dispatch modes: the per-step path of ``project_`` launches few ops around
its kernels and never synchronises with the host.

* op budget: a ``TorchDispatchMode`` counts every aten op one ``project_`` call dispatches; for k = 1 the glue
  around the two kernels (gram, combine_) must stay within ``K1_BUDGET`` ops (each op is a launch on a GPU,
  ~5 us: at GPT-2-small bf16 sizes the kernels themselves take ~0.1 ms).
* sync audit: a dispatch mode plus a function mode flag what would stall a GPU stream or break CUDA-graph
  capture: ``aten._local_scalar_dense`` (``.item()``, ``bool(tensor)``), tensors built from Python data
  (``aten.lift_fresh``: ``torch.tensor(...)``, ``torch.from_numpy``), host copies (``.cpu()``, ``.numpy()``,
  ``.tolist()``, ``.to(<device>)``). On CPU tensors nothing really syncs, so the audit looks at what the code
  asks for, which is what it would ask a GPU for. The k = 1 path is audited as the CUDA backends run it
  (``sync_free=True``); warm calls only (the first call of a parameter list builds and caches its tables).

Runs under ``ATAX_TEST_DEVICE=cuda`` too (``make gpu-check``): then the audited tensors are CUDA tensors.
"""
from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import atax_kernels
from atax_kernels import projection as P
from atax_kernels.ops.registry import resolve
from conftest import DEVICE

DEV = torch.device(DEVICE)
K1_BUDGET = 10  # torch ops around the kernels of one k = 1 project_ call
KERNEL_NAMESPACES = ("atax.", "atax_triton.", "higher_order.triton_kernel_wrapper")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (and custom ops) dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def glue(self) -> int:
        return sum(v for k, v in self.ops.items() if not k.startswith(KERNEL_NAMESPACES))

    def kernels(self, name: str) -> int:
        return sum(v for k, v in self.ops.items() if k.startswith(KERNEL_NAMESPACES) and name in k)


_SYNC_OPS = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.item")
_HOST_METHODS = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "pin_memory"}
_PY_DATA = {"tensor", "as_tensor", "from_numpy"}


class SyncAudit:
    """Context manager recording every host-sync / host-data request made inside it (``.flags``)."""

    def __init__(self):
        self.flags: list[str] = []
        audit = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                kwargs = kwargs or {}
                if name.startswith(_SYNC_OPS):
                    audit.flags.append(name)
                if name.startswith(("aten._to_copy", "aten.copy_")):
                    src = args[1] if name.startswith("aten.copy_") else args[0]
                    dst_dev = args[0].device if name.startswith("aten.copy_") else kwargs.get("device", src.device)
                    if torch.device(dst_dev) != src.device:
                        audit.flags.append(f"{name} {src.device}->{dst_dev}")
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", str(func))
                if name in _HOST_METHODS or name in _PY_DATA:
                    audit.flags.append(name)
                elif name == "to" and (kwargs.get("device") is not None or any(
                        isinstance(a, (str, torch.device)) for a in args[1:])):
                    audit.flags.append("to(device)")
                return func(*args, **kwargs)

        self._modes = (_Function(), _Dispatch())

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def _kernel_backend() -> str:
    if DEV.type == "cuda":
        return "cuda" if "cuda" in atax_kernels.available_backends() else "triton"
    if "cpu" not in atax_kernels.available_backends():
        pytest.skip("C++ extension not built (the op budget is about the glue around real kernels)")
    return "cpu"


def _problem(k: int, n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (64,), (3, 5, 2), (1,), (100,)][:n]
    grads = [torch.randn(s, generator=gen).to(DEV) for s in shapes]
    refs = [[torch.randn(s, generator=gen).to(DEV) for s in shapes] for _ in range(k)]
    return grads, refs


def _sync_free(name: str):
    # as on a GPU: the CUDA and Triton backends on CUDA tensors are sync-free
    return dataclasses.replace(resolve(name, DEV, {torch.float32}), sync_free=True)


# ------------------------------------------------------------------------------------------ op budget
@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("mode,alpha", [("orthogonal", 1.0), ("conflict", 1.0), ("orthogonal", 0.5)])
def test_k1_project_op_budget(granularity, mode, alpha):
    backend = _kernel_backend()
    grads, refs = _problem(1)
    atax_kernels.project_(grads, refs[0], mode=mode, strength=alpha, granularity=granularity, backend=backend)
    with OpCounter() as c:
        atax_kernels.project_(grads, refs[0], mode=mode, strength=alpha, granularity=granularity, backend=backend)
    assert c.kernels("gram") == 1 and c.kernels("combine_") == 1, dict(c.ops)
    assert c.glue <= K1_BUDGET, f"{c.glue} ops around the kernels (budget {K1_BUDGET}): {dict(c.ops)}"


def test_op_counter_can_fail():
    # the control: the general (k = 4) path costs far more than the k = 1 budget, and the counter sees it
    backend = _kernel_backend()
    grads, refs = _problem(4)
    atax_kernels.project_(grads, refs, backend=backend)
    with OpCounter() as c:
        atax_kernels.project_(grads, refs, backend=backend)
    assert c.glue > K1_BUDGET


# ------------------------------------------------------------------------------------------ sync audit
def test_sync_audit_flags_what_it_should():
    x = torch.randn(4, device=DEV)
    with SyncAudit() as a:
        x.sum().item()
        bool(x.sum() > 0)
        torch.tensor([1.0, 2.0], device=DEV)
        x.cpu()
        x.tolist()
        x.to("cpu")
    assert {"item", "__bool__", "tensor", "cpu", "tolist", "to(device)", "aten._local_scalar_dense.default",
            "aten.lift_fresh.default"} <= set(a.flags), a.flags


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("mode", ["orthogonal", "conflict"])
def test_k1_hot_path_never_syncs(granularity, mode):
    impl = _sync_free(_kernel_backend())
    grads, refs = _problem(1)
    P._project_resolved(impl, grads, refs, mode, 1.0, granularity)  # warm: tables cached
    with SyncAudit() as a:
        P._project_resolved(impl, grads, refs, mode, 1.0, granularity)
    assert a.flags == [], a.flags


def test_triton_hot_path_never_syncs():
    # the Triton ops are opaque to a dispatch mode, so their Python glue is audited directly
    tb = pytest.importorskip("atax_kernels.ops.triton")
    if not tb.available(DEV):
        pytest.skip(f"triton backend unavailable on {DEV}")
    import importlib

    tc = importlib.import_module("atax_kernels.ops.triton.combine")  # the package's gram/combine_ are functions
    tg = importlib.import_module("atax_kernels.ops.triton.gram")

    grads, refs = _problem(1, n=3)
    buf = torch.randn(300, device=DEV)  # views of one flat buffer: the kernels' flat layout
    flat_g = [buf[:91].view(13, 7), buf[91:155]]
    flat_r = [torch.randn(300, device=DEV)]
    flat_r = [[flat_r[0][:91].view(13, 7), flat_r[0][91:155]]]
    for g, r in ((grads, refs), (flat_g, flat_r)):
        for per_tensor in (False, True):
            vec = [*g, *r[0]]
            coefs = torch.full((len(g), 1) if per_tensor else (1,), 1e-3, dtype=torch.float64, device=DEV)
            tg._gram_impl(vec, 2, per_tensor)
            tc._combine_impl(g, r[0], coefs)
            with SyncAudit() as a:
                tg._gram_impl(vec, 2, per_tensor)
                tc._combine_impl(g, r[0], coefs)
            assert a.flags == [], (per_tensor, a.flags)


# ------------------------------------------------------------------------------------------ the stats it defers
def _oracle_k1(g, r, mode, alpha):
    g64 = torch.cat([t.double().flatten() for t in g]).cpu()
    r64 = torch.cat([t.double().flatten() for t in r]).cpu()
    b, rr, gg = g64 @ r64, r64 @ r64, g64 @ g64
    c = alpha * (b if mode == "orthogonal" else min(b, torch.zeros(()))) / rr
    return b, c, (b / (gg * rr).sqrt()), (c.abs() * rr.sqrt() / gg.sqrt())


@pytest.mark.parametrize("mode", ["orthogonal", "conflict"])
def test_k1_deferred_stats_match_oracle(mode):
    backend = _kernel_backend()
    grads, refs = _problem(1, seed=3)
    if mode == "conflict":  # make it conflict
        refs = [[-(g + 0.1 * r) for g, r in zip(grads, refs[0])]]
    b, c, cos, removed = _oracle_k1(grads, refs[0], mode, 0.7)
    st = atax_kernels.project_(grads, refs[0], mode=mode, strength=0.7, backend=backend)
    for got, want in ((st.dots[0], b), (st.coefs[0], c), (st.cosines[0], cos), (st.removed_fraction, removed)):
        assert abs(float(got) - float(want)) <= 1e-5 * (abs(float(want)) + 1e-3), (got, want)
    assert bool(st.projected) and not bool(st.skipped) and st.reason is None
    assert "ProjectionStats(" in repr(st) and st.as_dict()["coefs"][0] == pytest.approx(float(c), rel=1e-5)


def test_k1_nonfinite_gram_writes_nothing_without_syncing():
    impl = _sync_free(_kernel_backend())
    grads, refs = _problem(1, seed=4)
    grads[1][3] = float("inf")
    before = [t.clone() for t in grads]
    with SyncAudit() as a:
        st = P._project_resolved(impl, grads, refs, "orthogonal", 1.0, "global")
    assert a.flags == []
    assert all(torch.equal(x, y) for x, y in zip(before, grads))
    assert bool(st.skipped) and not bool(st.projected) and float(st.coefs[0]) == 0.0
    assert "the gradient" in st.reason


def test_k1_zero_reference_gets_zero_coefficient():
    impl = _sync_free(_kernel_backend())
    grads, refs = _problem(1, seed=5)
    refs = [[torch.zeros_like(t) for t in refs[0]]]
    before = [t.clone() for t in grads]
    st = P._project_resolved(impl, grads, refs, "orthogonal", 1.0, "tensor")
    assert torch.equal(st.coefs, torch.zeros_like(st.coefs)) and not bool(st.skipped)
    assert all(torch.equal(x, y) for x, y in zip(before, grads))
