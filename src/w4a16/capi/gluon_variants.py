"""The Gluon kernels baked into the C library, and their ahead-of-time compilation.

The C library runs the package's Gluon kernels (``w4a16.backends.gluon``) wherever they apply:
the decode kernel for M <= 64 and the prefill kernel above, on weights in the Gluon layout
(``repack_gluon.py`` builds it on the device). Constexprs are compiled in, so there is one cubin
per combination of

* config: the decode kernel at token tiles 8, 16, 32 and 64 (the heuristic's pipelines: one
  warpgroup of 64 rows, a producer warp, 4 stages up to 16 tokens and 3 above, scales after the
  MMA where the rule allows, programmatic dependent launch), each whole ("decode8": one program
  per tile, SPLIT 0) and K-split ("decode8k": SPLIT 1, partials summed in split order by the last
  range of each tile), and the prefill kernel's named configs "prefill-64", "prefill-128" and
  "prefill-128x128";
* group class: 32, 64, 128 and "wide" (a multiple of 256, or one group over K > 128: one scale row
  per pipeline stage), compiled with the class's representative group 32, 64, 128 or 256;
* activation dtype (fp16, bf16) and symmetric / with zero points.

They are compiled with the hints the C side guarantees before it picks them: 16-byte aligned
output, bias, partials and counters, and N % 16 == 0 (Triton's ``tt.divisibility`` 16). Bias is
always an input (a zero vector of the prepared weight stands in for NULL).

The C side computes a Gluon variant's index with the same formula as :func:`gluon_index`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_TILES = (8, 16, 32, 64)
PREFILL_CONFIGS = ("prefill-64", "prefill-128", "prefill-128x128")
CONFIGS = (tuple(f"decode{mt}" for mt in DECODE_TILES) + tuple(f"decode{mt}k" for mt in DECODE_TILES)
           + PREFILL_CONFIGS)
GROUP_CLASSES = (32, 64, 128, 256)     # 256: the "wide" class
DTYPES = ("fp16", "bf16")
HINTED_ARGS = (4, 5, 7, 8, 10)         # y_ptr, bias_ptr, part_ptr, cnt_ptr, N: divisible by 16 (6: res_ptr, None)
DECODE_PARAMS = 34                     # PTX parameters: 4 descriptors (22), 4 pointers, 6 scalars, 2 scratch
PREFILL_PARAMS = 37
REPACK_NAMES = ("gluon_codes_h32", "gluon_codes_h64", "gluon_params_fp16", "gluon_params_fp16_z",
                "gluon_params_bf16", "gluon_params_bf16_z")
REPACK_PARAMS = {"codes": 7, "params": 9}
PARAMS_BLOCK = 256


@dataclass(frozen=True)
class GluonVariant:
    config: str        # one of CONFIGS
    group_class: int   # one of GROUP_CLASSES
    dtype: str
    zeros: bool

    @property
    def name(self) -> str:
        return f"gluon_{self.config}_g{self.group_class}_{self.dtype}_{'zeros' if self.zeros else 'sym'}"

    @property
    def is_decode(self) -> bool:
        return self.config.startswith("decode")

    @property
    def torch_dtype(self):
        return torch.float16 if self.dtype == "fp16" else torch.bfloat16

    @property
    def split_mode(self) -> int:
        """The decode kernel's SPLIT: 1 for the K-split variants, else 0."""
        return 1 if self.config.endswith("k") else 0

    def decode_config(self):
        """The GluonDecodeConfig of a decode variant (the heuristic's pipeline at this token tile)."""
        from w4a16.backends.gluon.decode.config import GluonDecodeConfig
        mt = int(self.config[len("decode"):].rstrip("k"))
        nch = 4 if self.group_class == 32 else 2
        return GluonDecodeConfig(mt=mt, warps=4, nch=nch, stages=4 if mt <= 16 else 3)

    def prefill_config(self):
        from w4a16.backends.gluon.prefill.config import NAMED
        return NAMED[self.config]


def gluon_variants() -> list:
    """Every Gluon GEMM cubin of the library, in table order (see :func:`gluon_index`)."""
    return [GluonVariant(c, gc, dt, z) for c in CONFIGS for gc in GROUP_CLASSES for dt in DTYPES for z in (False, True)]


def gluon_index(v: GluonVariant) -> int:
    """Index of ``v`` in :func:`gluon_variants` (the C library computes the same)."""
    return ((CONFIGS.index(v.config) * len(GROUP_CLASSES) + GROUP_CLASSES.index(v.group_class)) * 2
            + DTYPES.index(v.dtype)) * 2 + int(v.zeros)


@dataclass(frozen=True)
class GluonPlanInfo:
    """What the C launcher needs beyond the cubin: the tile shape, pipeline stage and occupancy."""
    kind: int          # 0 decode, 1 prefill
    mt: int            # tokens per tile
    tile_n: int        # weight rows per program tile
    kh: int            # half-chunk length (32 or 64)
    ks: int            # values of K per pipeline stage
    resident: int      # programs per SM (the decode launcher's wave model; 1 for prefill)
    pdl: bool          # launched as a programmatic dependent launch
    descs: tuple       # per descriptor (codes, x, scales, offsets): (swizzle, elem_size, cu_elem_type, box)


def _descs(metadata) -> tuple:
    """Per descriptor argument: (swizzle, element bytes, CUtensorMapDataType, box), as Triton's own
    launcher would encode it (the device-side dtype code mapped by its TMA_DTYPE_DEVICE_TO_HOST)."""
    from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
    return tuple((int(d["swizzle"]), int(d["elem_size"]), TMA_DTYPE_DEVICE_TO_HOST[int(d["elem_type"])],
                  tuple(int(b) for b in d["block_size"])) for d in metadata.tensordesc_meta)


def compile_gluon(v: GluonVariant):
    """(compiled kernel, GluonPlanInfo) of one Gluon variant (sm_90a)."""
    from w4a16.backends.gluon.layout import half_chunk
    from w4a16.backends.gluon.offline import compile_decode, compile_prefill

    attrs = {(i,): [["tt.divisibility", 16]] for i in HINTED_ARGS}
    kh = half_chunk(v.group_class)
    if v.is_decode:
        cfg = v.decode_config()
        k = compile_decode(cfg, v.torch_dtype, v.zeros, v.group_class, True, v.split_mode, attrs=attrs)
        info = GluonPlanInfo(0, cfg.mt, 16 * cfg.warps, kh, cfg.nch * 2 * kh, cfg.resident(kh, v.zeros), cfg.pdl,
                             _descs(k.metadata))
    else:
        cfg = v.prefill_config()
        k = compile_prefill(cfg, v.torch_dtype, v.zeros, v.group_class, True, attrs=attrs)
        info = GluonPlanInfo(1, cfg.mt, cfg.rows, kh, cfg.nch * 2 * kh, 1, False, _descs(k.metadata))
    return k, info


def compile_gluon_repack(name: str):
    """The compiled repack kernel ``name`` (one of REPACK_NAMES)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from w4a16.backends.triton_compat import COMPILE_OPTIONS
    from .repack_gluon import repack_gluon_codes_kernel, repack_gluon_params_kernel

    if name.startswith("gluon_codes"):
        sig = {"b_ptr": "*u8", "out_ptr": "*u8", "N": "i32", "K": "i32", "chunks": "i32", "KH": "constexpr"}
        src = ASTSource(repack_gluon_codes_kernel, sig, {"KH": int(name[len("gluon_codes_h"):])})
    else:
        dt = name.split("_")[2]
        sig = {"s_ptr": f"*{dt}", "z_ptr": f"*{dt}", "st_ptr": f"*{dt}", "ot_ptr": f"*{dt}", "N": "i32", "G": "i32",
               "N8": "i32", "HAS_ZEROS": "constexpr", "BLOCK": "constexpr"}
        src = ASTSource(repack_gluon_params_kernel, sig, {"HAS_ZEROS": name.endswith("_z"), "BLOCK": PARAMS_BLOCK})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": 1, **COMPILE_OPTIONS})
