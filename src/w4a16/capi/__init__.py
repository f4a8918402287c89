"""The C library: the package's Triton kernels compiled ahead of time into
``libw4a16_sm90_kernel.so`` with the original's C entry points (see docs/capi.md).

    from w4a16.capi import build_lib
    build_lib("out/capi")               # or: w4a16 build-lib --out out/capi
"""
from .build import BuildResult, build_lib, find_cuda_include

__all__ = ["BuildResult", "build_lib", "find_cuda_include"]
