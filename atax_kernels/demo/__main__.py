"""``python -m atax_kernels.demo``: runs :func:`atax_kernels.demo.cli.main`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
