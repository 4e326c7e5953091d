"""Warnings that point at the user's line: the ``stacklevel`` of the first frame outside this package (and
outside torch's ``no_grad`` decorator wrapper), however deep inside the library the warning is raised. A leaf."""
from __future__ import annotations

import os
import sys

__all__ = ["user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_WRAPPER = os.path.join("torch", "utils", "_contextlib.py")


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that names the user's frame."""
    f, level = sys._getframe(1), 1
    while f is not None and (f.f_code.co_filename.startswith(_PACKAGE_DIR)
                             or f.f_code.co_filename.endswith(_TORCH_WRAPPER)):
        f, level = f.f_back, level + 1
    return level
