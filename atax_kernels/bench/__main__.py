"""``python -m atax_kernels.bench``: runs :func:`atax_kernels.bench.cli.main`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
