"""Setup shim: pyproject.toml holds the metadata; this file only adds the optional AOT extension.

``ATAX_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiles the C++ (and, with a CUDA toolkit,
CUDA) kernels ahead of time as ``atax_kernels._C``. Without it nothing is compiled here and the extension
builds on first use. torch is never imported unless the AOT build was asked for.
"""
import importlib.util
import os

from setuptools import setup

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_setup_ext", os.path.join(_here, "atax_kernels", "_setup_ext.py"))
_setup_ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_setup_ext)

setup(ext_modules=_setup_ext.ext_modules_for_setup(), cmdclass=_setup_ext.cmdclass_for_setup())
