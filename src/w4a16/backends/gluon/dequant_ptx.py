"""Inline PTX of the Gluon kernels' int4 -> fp16 / bf16 dequant, for ``gl.inline_asm_elementwise``
with pack = 4: operand $4 holds a thread's 4 code bytes (8 nibbles, bytes ordered e0 e2 e1 e3 by
``layout.py``), $0 $1 receive the low-half register pairs and $2 $3 the high-half pairs of the
wgmma A fragment. With ``order="triton"`` the bytes come in the Triton kernels' layout order
(e0 e1 e2 e3, ``backends/triton/layout.py``): one ``prmt`` puts them in the order above first.

fp16: lo = (w & 0x000F000F) | 0x6400 = 1024 + q (the pair e0, e1), (w >> 8) gives e2, e3; hi =
(w & 0x00F000F0) | 0x6400 = 1024 + 16 q, and hi / 16 - 64 = q. bf16 (7 mantissa bits): every
nibble is shifted to bits 0..3 first, and (w | 0x4300) = 128 + q.

Two programs per dtype:
- scaled (the scales folded in): q * s + o, with $5 $6 s_lo, $7 $8 o_lo, $9 $10 s_hi, $11 $12
  o_hi (13 instructions per 8 weights in fp16, 15 in bf16);
- integer (symmetric weights, the scale applied after the MMA): q - 8, exact (9 in fp16, 11 in
  bf16).
"""

_FP16_NIBBLES = """shr.b32 u, $4, 8;
lop3.b32 a, $4, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b, u, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 c, $4, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 d, u, 0x00F000F0, 0x64006400, 0xEA;
"""

_BF16_NIBBLES = """shr.b32 u, $4, 8;
shr.b32 v, $4, 4;
shr.b32 x, $4, 12;
lop3.b32 a, $4, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 b, u, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 c, v, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 d, x, 0x000F000F, 0x43004300, 0xEA;
"""

_SCALE = "fma.rn.{t}x2 $0, a, $5, $7;\nfma.rn.{t}x2 $1, b, $6, $8;\nfma.rn.{t}x2 $2, c, $9, $11;\nfma.rn.{t}x2 $3, d, $10, $12;\n"


def dequant_ptx(dtype: str, scaled: bool, order: str = "gluon") -> str:
    """The PTX block for ``dtype`` ("fp16" or "bf16"); ``scaled``: q * s + o, else q - 8; ``order``:
    the code bytes of a word as the Gluon layout ("gluon") or the Triton layout ("triton") stores them."""
    out = ("a", "b", "c", "d") if scaled else ("$0", "$1", "$2", "$3")
    if dtype == "fp16":
        m, n = ("0x64006400", "0xD400D400") if scaled else ("0x64086408", "0xD480D480")   # 1024 | 1032, -64 | -72
        body = (".reg .b32 u, a, b, c, d, m, h, n;\n"
                f"mov.b32 m, {m};\nmov.b32 h, 0x2C002C00;\nmov.b32 n, {n};\n" + _FP16_NIBBLES +
                f"sub.f16x2 {out[0]}, a, m;\nsub.f16x2 {out[1]}, b, m;\n"
                f"fma.rn.f16x2 {out[2]}, c, h, n;\nfma.rn.f16x2 {out[3]}, d, h, n;\n")
        t = "f16"
    elif dtype == "bf16":
        m = "0xC300C300" if scaled else "0xC308C308"   # -128 | -136
        body = (".reg .b32 u, v, x, a, b, c, d, m, one;\n"
                f"mov.b32 m, {m};\nmov.b32 one, 0x3F803F80;\n" + _BF16_NIBBLES +
                "".join(f"fma.rn.bf16x2 {o}, {i}, one, m;\n" for o, i in zip(out, "abcd")))
        t = "bf16"
    else:
        raise ValueError(f"dtype: expected 'fp16' or 'bf16', got {dtype!r}")
    if scaled:
        body += _SCALE.format(t=t)
    if order == "triton":
        # bytes (e0, e1, e2, e3) -> (e0, e2, e1, e3); the programs above then read the word q
        body = body.replace("$4", "q").replace(".reg .b32 ", ".reg .b32 q, ", 1)
        head, rest = body.split("\n", 1)
        body = head + "\nprmt.b32 q, $4, 0, 0x3120;\n" + rest
    elif order != "gluon":
        raise ValueError(f"order: expected 'gluon' or 'triton', got {order!r}")
    return "{\n" + body + "}\n"
