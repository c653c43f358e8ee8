"""Builds sparseland's C++ kernels (sparseland/runtime/csrc) with torch's extension machinery.

Metadata lives in pyproject.toml. Install with `pip install --no-build-isolation -e .` after torch
(the Makefile does this) so the kernels compile against the installed CPU build of torch.
"""

from pathlib import Path

from setuptools import setup

CSRC = Path(__file__).parent / "sparseland" / "runtime" / "csrc"
sources = sorted(str(p.relative_to(Path(__file__).parent)) for p in CSRC.glob("*.cpp")) if CSRC.exists() else []

ext_modules, cmdclass = [], {}
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "sparseland.runtime._C",
            sources,
            extra_compile_args=["-O3", "-march=haswell", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
