"""Shared test set-up.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be
set before anything imports triton (kernels read it when they are defined), so it is set here,
before any test module imports w4a16.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import Triton now, under this setting: its own @jit helpers (tl.cdiv, ...) take the mode in
    # force at import, and a later test that turns the interpreter off for a while (reference
    # path) may import it indirectly (transformers does), which would break the kernel tests after it.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The interpreter computes bf16 dots wrongly: the kernels are checked in bf16 on a GPU only.
KERNEL_DTYPES = (torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float16,)

requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config):
    # Triton's interpreter itself triggers this NumPy deprecation on every launch.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``@pytest.mark.gpu`` when there is no CUDA GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so every test draws the same random inputs each run."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def device() -> torch.device:
    """The device the kernels run on: the GPU where there is one, else the CPU (interpreter)."""
    return DEVICE


@pytest.fixture
def reference_gemm(monkeypatch):
    """CPU tensors take w4a16's pure-torch reference path for this test (the kernels, run in Triton's
    interpreter, have their own tests). Use: ``pytestmark = pytest.mark.usefixtures("reference_gemm")``."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def reference_gemm_module():
    """:func:`reference_gemm` for a whole module (whole-model runs: the interpreter would take hours)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


@pytest.fixture(scope="session")
def built_capi(tmp_path_factory):
    """The C library, built once per test session (``w4a16.capi.build_lib``; about 35 s on 2 cores)."""
    from w4a16.capi import build
    return build.build_lib(tmp_path_factory.mktemp("capi"))
