"""ctypes binding of ``libw4a16_sm90_kernel.so`` (used by the GPU tests and the timing script).

    lib = load("out/capi/libw4a16_sm90_kernel.so")
    lib.w4a16_sm90_gemm_128_ex(A, B, scales, zeros, bias, alpha, C, m, n, k, g, None, ws, ws_bytes,
                               stream, None)        # pointers as ints (tensor.data_ptr()) or None
"""
from __future__ import annotations

import ctypes
from pathlib import Path

VP, U8P, CP, SZ, I, F = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_float
IP = ctypes.POINTER(ctypes.c_int)


class GemmConfig(ctypes.Structure):
    """``w4a16_gemm_config``: kernel (W4A16_KERNEL_*), split_k, flags (W4A16_FLAG_*), reserved[5]."""
    _fields_ = [("kernel", I), ("split_k", I), ("flags", I), ("reserved", I * 5)]


class PreparedWeight(ctypes.Structure):
    """``w4a16_prepared_weight``."""
    _fields_ = [("data", VP), ("bytes", SZ), ("n", I), ("k", I), ("group_size", I), ("dtype", I),
                ("has_zeros", I), ("layout", I), ("reserved", I * 2)]


KERNELS = {"auto": 0, "tile256": 1, "tile128": 2, "splitk64": 3, "decode": 4, "gluon_decode": 5, "gluon_prefill": 6}
LAYOUT_TRITON, LAYOUT_GLUON = 1, 2   # w4a16_prepared_weight.layout


def gluon_applies(M: int, N: int, K: int, group_size: int) -> bool:
    """Whether the library runs this weight on its Gluon kernels (given 16-byte aligned A, C and
    bias): K % 8 == 0, N % 16 == 0, group 32, 64, 128, a multiple of 256, or one group over K > 128."""
    g = K if group_size in (-1, 0) else group_size
    return K % 8 == 0 and N % 16 == 0 and (g in (32, 64, 128) or g % 256 == 0 or (g == K and K > 128))
PLAIN = [VP, U8P, VP, VP, VP, F, VP, I, I, I, I, ctypes.POINTER(GemmConfig), CP, SZ, VP, IP]
SIGNATURES = {
    "w4a16_sm90_gemm_128": (None, PLAIN), "w4a16_sm90_gemm_64": (None, PLAIN),
    "w4a16_sm90_gemm_128_ex": (I, PLAIN), "w4a16_sm90_gemm_64_ex": (I, PLAIN),
    "w4a16_sm90_gemm_128_bf16": (I, PLAIN), "w4a16_sm90_gemm_64_bf16": (I, PLAIN),
    "w4a16_sm90_workspace_size": (SZ, [I, I, I, I, ctypes.POINTER(GemmConfig)]),
    "w4a16_sm90_prepared_size": (SZ, [I, I, I, I]),
    "w4a16_sm90_prepare": (I, [U8P, VP, VP, I, I, I, I, VP, ctypes.POINTER(PreparedWeight)]),
    "w4a16_sm90_gemm_prepared": (I, [VP, ctypes.POINTER(PreparedWeight), VP, F, VP, I, ctypes.POINTER(GemmConfig),
                                     CP, SZ, VP, IP]),
    "w4a16_sm90_cache_clear": (None, []), "w4a16_sm90_cache_forget": (I, [U8P]),
    "w4a16_sm90_cache_bytes": (SZ, []), "w4a16_get_last_error": (I, []), "w4a16_peek_last_error": (I, []),
    "w4a16_last_error_message": (ctypes.c_char_p, []), "w4a16_status_string": (ctypes.c_char_p, [I]),
    "w4a16_sm90_last_kernel": (ctypes.c_char_p, []), "w4a16_version": (I, []), "w4a16_capi_version": (I, []),
    "w4a16_version_string": (ctypes.c_char_p, []),
}


def load(path) -> ctypes.CDLL:
    """Opens the library and declares every entry point's argument and result types."""
    lib = ctypes.CDLL(str(Path(path).resolve()))
    for name, (res, args) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


FLAG_ZEROED_WORKSPACE = 1   # W4A16_FLAG_ZEROED_WORKSPACE
COUNTER_REGION_BYTES = 65536


def config(kernel: str = "auto", split_k: int = 0, flags: int = 0):
    """A ``w4a16_gemm_config`` for ``kernel`` (None for "auto" with no split and no flags: the
    default)."""
    if kernel == "auto" and not split_k and not flags:
        return None
    return ctypes.byref(GemmConfig(KERNELS[kernel], split_k, flags))
