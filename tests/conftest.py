"""Test configuration: device selection, Triton interpreter, backends under test.

``ATAX_TEST_DEVICE=cuda`` (set by ``make gpu-check``) runs the suite on CUDA tensors; otherwise tests run
on CPU tensors and the Triton kernels run under ``TRITON_INTERPRET=1``.
"""
import os

DEVICE = os.environ.get("ATAX_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    # Must be set before any triton kernel is defined (i.e. before atax_kernels.ops.triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("ATAX_BACKEND", None)  # tests pick backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402


def backends_under_test() -> list[str]:
    import atax_kernels
    from atax_kernels.ops.registry import _supports_device

    dev = torch.device(DEVICE)
    return [b for b in atax_kernels.available_backends() if _supports_device(b, dev)]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(DEVICE)


def pytest_report_header(config):
    try:
        return f"atax device={DEVICE} backends={backends_under_test()}"
    except Exception as exc:  # a header must never break collection
        return f"atax device={DEVICE} backends=? ({exc})"
