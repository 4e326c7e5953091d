"""`python -m atax_kernels.build`: build (or load the cached) C++/CUDA extension now and print
build_info() as JSON. Exit status 0 when the extension loaded, 1 otherwise."""
from __future__ import annotations

import json
import sys


def main() -> int:
    from . import _ext

    mod = _ext.load()
    info = _ext.build_info()
    print(json.dumps(info, indent=2, default=str))
    return 0 if mod is not None else 1


if __name__ == "__main__":
    sys.exit(main())
