"""How the kernels run in this process (no Triton import, so the package loads without it)."""
import contextlib
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def interpreter_unset():
    """TRITON_INTERPRET removed from the environment meanwhile, restored after: for compiling real
    cubins (an interpreted kernel cannot be compiled) and for worker processes started meanwhile
    (Triton decides when a kernel module is imported whether its kernels are interpreted)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def triton_version() -> str:
    """The version of the Triton this process runs: the imported module's when it is imported (a
    triton first on PYTHONPATH shadows the installed one), else the installed package's metadata
    (read without importing it: importing fixes its settings); "not installed" when absent."""
    import importlib.metadata
    import sys

    module = sys.modules.get("triton")
    if module is not None and getattr(module, "__version__", None):
        return module.__version__
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"
