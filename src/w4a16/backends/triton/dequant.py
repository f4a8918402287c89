"""int4 -> fp16/bf16 conversion inside the kernels.

Both helpers take a chunk tile ``t`` uint8 [BN, H] (see layout.py; low nibbles: the first
half chunk, high nibbles: the second) and return the two half-chunk weight tiles [BN, H] as
*integer values* q - z in the activation dtype (exact for integer zero points); the caller
applies the per-row scales (to the tiles, or with ``scale_after`` to the MMA's products).

* :func:`codes_portable` uses plain Triton ops (runs in the interpreter too).
* :func:`codes_magic` does the conversion in one inline-PTX block per 4 bytes: a byte permute,
  then ``lop3`` puts each nibble into the mantissa of the magic number 1024 (fp16, 0x6400) or
  128 (bf16, 0x4300), and one packed subtract/FMA removes the magic (and, for symmetric
  weights, the zero point 8): about 1.25 instructions per weight and no int->float converts.
"""
import triton
import triton.language as tl

# fp16: lo = (t & 0xF) | 0x6400 = 1024 + q;  hi = (t & 0xF0) | 0x6400 = 1024 + 16 q,
# then hi * (1/16) - 64 = q.  Registers: $0 $1 lo pairs, $2 $3 hi pairs, $4 the 4 input bytes.
_FP16_ASM = """
{
.reg .b32 t, u, c, m, f, o;
prmt.b32 t, $4, 0, 0x3120;
shr.b32 u, t, 8;
lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, u, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $2, t, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $3, u, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 c, LO_MAGIC;
mov.b32 m, 0x2C002C00;
mov.b32 o, HI_OFFSET;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
fma.rn.f16x2 $2, $2, m, o;
fma.rn.f16x2 $3, $3, m, o;
}
"""

# bf16 has 7 mantissa bits, so both nibbles go to bits 0..3 first: lo = (t & 0xF) | 0x4300 = 128 + q.
_BF16_ASM = """
{
.reg .b32 t, u, t4, u4, one, c;
prmt.b32 t, $4, 0, 0x3120;
shr.b32 u, t, 8;
shr.b32 t4, t, 4;
shr.b32 u4, t, 12;
lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, u, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $2, t4, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $3, u4, 0x000F000F, 0x43004300, 0xEA;
mov.b32 one, 0x3F803F80;
mov.b32 c, NEG_MAGIC;
fma.rn.bf16x2 $0, $0, one, c;
fma.rn.bf16x2 $1, $1, one, c;
fma.rn.bf16x2 $2, $2, one, c;
fma.rn.bf16x2 $3, $3, one, c;
}
"""

# Constants: subtract the magic, and 8 more for symmetric weights (their zero point).
FP16_ASM_SYM = tl.constexpr(_FP16_ASM.replace("LO_MAGIC", "0x64086408").replace("HI_OFFSET", "0xD480D480"))
FP16_ASM_RAW = tl.constexpr(_FP16_ASM.replace("LO_MAGIC", "0x64006400").replace("HI_OFFSET", "0xD400D400"))
BF16_ASM_SYM = tl.constexpr(_BF16_ASM.replace("NEG_MAGIC", "0xC308C308"))
BF16_ASM_RAW = tl.constexpr(_BF16_ASM.replace("NEG_MAGIC", "0xC300C300"))


@triton.jit
def codes_portable(t, z_lo, z_hi, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr):
    """t uint8 [BN, H] -> (q_lo - z, q_hi - z) [BN, H] in DTYPE; z_*: [BN] zeros (if HAS_ZEROS)."""
    lo = (t & 0xF).to(DTYPE)
    hi = (t >> 4).to(DTYPE)
    if HAS_ZEROS:
        lo = lo - z_lo[:, None]
        hi = hi - z_hi[:, None]
    else:
        lo = lo - 8.0
        hi = hi - 8.0
    return lo, hi


@triton.jit
def codes_magic(t, z_lo, z_hi, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr):
    """Same contract as :func:`codes_portable`, through inline PTX (GPU only)."""
    if DTYPE == tl.float16:
        if HAS_ZEROS:
            lo, hi = tl.inline_asm_elementwise(FP16_ASM_RAW, "=r,=r,=r,=r,r", [t],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(FP16_ASM_SYM, "=r,=r,=r,=r,r", [t],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        if HAS_ZEROS:
            lo, hi = tl.inline_asm_elementwise(BF16_ASM_RAW, "=r,=r,=r,=r,r", [t],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(BF16_ASM_SYM, "=r,=r,=r,=r,r", [t],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    if HAS_ZEROS:
        lo = lo - z_lo[:, None]
        hi = hi - z_hi[:, None]
    return lo, hi
