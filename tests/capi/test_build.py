"""The C library builds on a machine without a GPU: entry points exported, header clean under
-Wall -Werror (C and C++), kernel table in the order the C side indexes it, host-side plans, the
repack kernels equal to the Python layout (Triton interpreter)."""
import os
import shutil
import subprocess
import textwrap

import pytest
import torch

from w4a16.capi import build, gluon_variants, variants
from w4a16.errors import W4A16Error

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _cuda_include():
    try:
        return build.find_cuda_include()
    except Exception:
        return None


needs_cuda_h = pytest.mark.skipif(_cuda_include() is None, reason="needs cuda.h (CUDA headers or the Triton wheel)")


@pytest.fixture(scope="module")
def built(built_capi):
    return built_capi


def _cc(tmp_path, name, code, *args, compiler="gcc"):
    src = tmp_path / name
    src.write_text(textwrap.dedent(code))
    exe = tmp_path / (src.stem + ".out")
    r = subprocess.run([compiler, "-Wall", "-Wextra", "-Werror", str(src), *args, "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return exe


@needs_gcc
@needs_cuda_h
def test_build_exports_entry_points(built):
    assert built.library.is_file() and built.header.is_file() and built.test_program.is_file()
    assert (built.out_dir / "Makefile").is_file()
    assert built.kernels == (len(variants.gemm_variants()) + len(variants.REPACK_NAMES) + len(gluon_variants.REPACK_NAMES)
                             + len(gluon_variants.gluon_variants())) and not built.missing
    nm = subprocess.run(["nm", "-D", "--defined-only", str(built.library)], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if " T " in line}
    assert set(build.ENTRY_POINTS) <= exported
    assert all(name.startswith("w4a16_") for name in exported), exported - set(build.ENTRY_POINTS)
    # The library needs only libc at load time (the CUDA driver is opened at run time).
    needed = subprocess.run(["readelf", "-d", str(built.library)], capture_output=True, text=True).stdout
    assert "libcuda" not in needed and "libcudart" not in needed


@needs_gcc
@needs_cuda_h
def test_header_compiles_and_links(built, tmp_path):
    code = """
        #include <stdio.h>
        #include "w4a16_sm90_kernel.h"
        int main(void) {
            w4a16_gemm_config cfg = {W4A16_KERNEL_DECODE, 4, 0, {0}};
            void (*entry)(const void *, const uint8_t *, const void *, const void *, const void *, float, void *,
                          int, int, int, int, const w4a16_gemm_config *, char *, size_t, void *, int *) =
                w4a16_sm90_gemm_128;
            (void)entry;
            printf("%d %s %zu %zu\\n", w4a16_version(), w4a16_version_string(),
                   w4a16_sm90_workspace_size(16, 4096, 4096, 128, &cfg), w4a16_sm90_prepared_size(4096, 4096, 128, 0));
            int st = w4a16_sm90_gemm_64_ex(0, 0, 0, 0, 0, 1.0f, 0, 1, 64, 100, 48, 0, 0, 0, 0, 0);
            printf("%d %s\\n", st, w4a16_last_error_message());
            return st == W4A16_ERROR_INVALID_VALUE ? 0 : 1;
        }
    """
    exe = _cc(tmp_path, "use_header.c", code, f"-I{built.out_dir}", "-std=c99", f"-L{built.out_dir}",
              "-lw4a16_sm90_kernel", f"-Wl,-rpath,{built.out_dir}")
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sm_90a" in r.stdout and "group_size" in r.stdout
    if shutil.which("g++"):
        cpp = '#include "w4a16_sm90_kernel.h"\nint main() { return w4a16_capi_version() - W4A16_CAPI_VERSION; }\n'
        _cc(tmp_path, "use_header.cpp", cpp, f"-I{built.out_dir}", "-c", compiler="g++")


@needs_gcc
@needs_cuda_h
def test_host_logic_and_kernel_table(built, tmp_path):
    """Compiles the library's C source into a probe: the table order matches variants.py, layouts and
    plans match the Python launcher's rules."""
    names = [v.name for v in variants.gemm_variants()]
    checks = "\n".join(
        f'    if (strcmp(w4a16_cubins[variant_index({variants.KERNELS.index(v.kernel)}, {int(v.generic)}, '
        f'&(layout_t){{.dtype = {variants.DTYPES.index(v.dtype)}, .has_zeros = {int(v.zeros)}, '
        f'.gidx = {variants.GROUP_CLASSES.index(v.group_class)}}})].name, "{v.name}")) bad++;'
        for v in variants.gemm_variants())
    code = f"""
        #include "w4a16_sm90_kernel.c"
        int main(void) {{
            int bad = 0;
        {checks}
            layout_t L;
            if (make_layout(4096, 4096, 128, 0, 0, &L) || L.k_pad != 4096 || L.g_pad != 32 || L.kc != 128) bad += 100;
            if (make_layout(200, 1376, 32, 0, 1, &L) || L.k_pad != 1408 || L.kc != 64 || L.g_pad != 44) bad += 200;
            if (make_layout(136, 1000, -1, 1, 0, &L) || L.gclass != 128 || L.k_pad != 1024 || L.g_pad != 8) bad += 300;
            if (make_layout(64, 576, 64, 0, 0, &L) || L.gclass != 64 || L.k_pad != 640) bad += 400;
            if (make_layout(64, 768, 96, 0, 0, &L) || L.gclass != 32) bad += 500;
            if (!make_layout(64, 100, 32, 0, 0, &L) || !make_layout(64, 256, 48, 0, 0, &L)) bad += 600;
            plan_t p;
            make_layout(4096, 4096, 128, 0, 0, &L);
            /* M = 1: decode, 10 splits (the H200 table's winner for this shape), rows all. */
            make_plan(0, NULL, &L, 1, 132, 4 << 20, 0, &p);
            if (p.kernel != K_DECODE || p.splits != 11 || p.per != 3) bad += 1000;
            make_plan(0, NULL, &L, 64, 132, 4 << 20, 0, &p);
            if (p.kernel != K_SPLITK64 || p.splits * 64 * 4096 * 4 > (4 << 20)) bad += 2000;
            make_plan(0, NULL, &L, 1024, 132, 4 << 20, 0, &p);
            if (p.kernel != K_TILE256 || p.need != 0) bad += 3000;
            make_plan(1, NULL, &L, 1024, 132, 64 << 20, 0, &p);   /* _64: split-K 64x64 at any M ... */
            if (p.kernel != K_SPLITK64) bad += 4000;
            make_plan(1, NULL, &L, 1024, 132, 4 << 20, 0, &p);    /* ... if the partial sums fit */
            if (p.kernel != K_TILE128) bad += 4500;
            make_plan(0, NULL, &L, 200, 132, 4 << 20, 1, &p);
            if (p.kernel != K_TILE128) bad += 5000;
            make_plan(0, NULL, &L, 16, 132, 0, 0, &p);   /* no workspace: the tile kernel */
            if (p.kernel != K_TILE128) bad += 6000;
            make_plan(0, NULL, &L, 16, 132, 300000, 0, &p);   /* a little: fewer splits */
            if (p.kernel != K_DECODE || p.need > 300000) bad += 7000;
            w4a16_gemm_config cfg = {{W4A16_KERNEL_DECODE, 3, 0, {{0}}}};
            make_plan(0, &cfg, &L, 500, 132, 64 << 20, 0, &p);
            if (p.kernel != K_DECODE || p.splits != 3 || p.zeroed) bad += 8000;
            /* a zeroed workspace: the fixed counter region, no memset, launches of <= 16384 tiles */
            cfg.flags = W4A16_FLAG_ZEROED_WORKSPACE;
            make_plan(0, &cfg, &L, 500, 132, 64 << 20, 0, &p);
            if (!p.zeroed || p.need != ALIGN + p.part_bytes + W4A16_COUNTER_REGION_BYTES) bad += 8100;
            cfg.kernel = W4A16_KERNEL_SPLITK64;   /* 64 x 64 tiles: 64 column tiles, so 256 row tiles per launch */
            make_plan(1, &cfg, &L, 100000, 132, (size_t)1 << 40, 0, &p);
            if (p.kernel != K_SPLITK64 || !p.zeroed || p.rows != 256 * 64) bad += 8200;
            cfg.kernel = W4A16_KERNEL_DECODE;
            make_plan(0, &cfg, &L, 16, 132, 0, 0, &p);   /* no workspace: the tile kernel, nothing zeroed */
            if (p.kernel != K_TILE128 || p.zeroed) bad += 8300;
            cfg.flags = 2;
            if (make_plan(0, &cfg, &L, 500, 132, 64 << 20, 0, &p) != W4A16_ERROR_INVALID_VALUE) bad += 8400;
            cfg.flags = 0;
            cfg.reserved[2] = 1;
            if (make_plan(0, &cfg, &L, 500, 132, 64 << 20, 0, &p) != W4A16_ERROR_INVALID_VALUE) bad += 9000;
            if (row_block(100000, 4096, 4096, 8) * 4096LL * 8 >= INT32_LIMIT) bad += 10000;
            printf("%d\\n", bad);
            return bad != 0;
        }}
    """
    r = run_probe(built, tmp_path, "probe.c", code)
    assert r.returncode == 0, f"probe: {r.stdout}{r.stderr} (table: {names[:4]}...)"


def run_probe(built, tmp_path, name: str, code: str) -> subprocess.CompletedProcess:
    """Compiles ``code`` (a C program that #includes the library's C source, so it can call the
    static host functions) against the built library's sources and cubins, and runs it."""
    inc = build.find_cuda_include()
    src = built.out_dir / "src"
    exe = _cc(tmp_path, name, code, "-std=c11", "-Wno-unused-function", f"-I{src}", f"-I{inc}",
              str(src / "w4a16_cubins.S"), "-ldl", "-lpthread", "-Wa,-I" + str(src))
    return subprocess.run([str(exe)], capture_output=True, text=True)


@needs_gcc
@needs_cuda_h
def test_test_program_fails_cleanly_without_gpu(built):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU driver is present")
    r = subprocess.run([str(built.test_program), "--iters", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "libcuda" in r.stderr + r.stdout


def test_missing_cuda_header_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(build, "SYSTEM_CUDA_INCLUDE", tmp_path / "none")
    monkeypatch.setattr(build, "_triton_cuda_include", lambda: None)
    with pytest.raises(W4A16Error, match="cuda.h"):
        build.find_cuda_include(str(tmp_path / "nowhere"))
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert build.find_cuda_include() == tmp_path / "include"


@pytest.mark.parametrize("N,K,g", [(40, 256, 128), (16, 192, 64), (33, 96, 32), (20, 100, -1)])
def test_repack_kernels_match_layout(N, K, g):
    """The repack kernels (interpreted on the CPU) produce the Python layout's bytes exactly."""
    if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import triton

    import w4a16
    from w4a16.backends.triton.layout import prepare_layout
    from w4a16.capi.repack import repack_codes_kernel, repack_scales_kernel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    qw = w4a16.quantize(torch.randn(N, K), g, symmetric=False, dtype=torch.float16).to(dev)
    pw = prepare_layout(qw)
    H, chunks, nb = pw.kc // 2, pw.K_pad // pw.kc, -(-N // 16)
    qk = torch.zeros(nb, chunks * 16 * H, dtype=torch.uint8, device=dev)
    repack_codes_kernel[(nb, chunks)](qw.qweight, qk, N, K, chunks, H=H)
    assert torch.equal(qk, pw.qk)
    geff = K if g == -1 else g
    for src, ref in ((qw.scales, pw.scales_t), (qw.zeros, pw.zeros_t)):
        gp = ref.shape[0]
        dst = torch.zeros(gp, N, dtype=torch.float16, device=dev)
        d32 = torch.zeros(gp, N, device=dev)
        repack_scales_kernel[(gp, triton.cdiv(N, 64))](src, dst, d32, N, K, src.shape[1], geff,
                                                        geff if g != -1 else pw.K_pad, BLOCK=64)
        assert torch.equal(dst, ref) and torch.equal(d32, ref.float())


def _emulate(x, qw, bias, alpha, kernel, generic, splits):
    """What the C library launches for one call, run by Triton's interpreter: the repack kernels
    into the prepared layout (group class, regrouped scales), then the GEMM variant's constexprs
    (USE_ASM off: the interpreter has no PTX) with the C launcher's arguments."""
    import triton
    import triton.language as tl

    from w4a16.backends.triton.gemm import w4a16_gemm_kernel
    from w4a16.capi.repack import repack_codes_kernel, repack_scales_kernel

    M, K = x.shape
    N = qw.shape[0]
    g = K if qw.group_size == -1 else qw.group_size
    gclass = 128 if (g == K or g % 128 == 0) else (64 if g % 64 == 0 else 32)
    kc = 64 if gclass == 32 else 128
    k_pad = -(-K // kc) * kc
    chunks, nb, g_pad = k_pad // kc, -(-N // 16), k_pad // gclass
    qk = torch.zeros(nb, k_pad * 8, dtype=torch.uint8)
    repack_codes_kernel[(nb, chunks)](qw.qweight, qk, N, K, chunks, H=kc // 2)
    shape = variants.SHAPES[kernel]
    prepared = []
    for src in (qw.scales, qw.zeros if qw.zeros is not None else qw.scales):
        d16 = torch.zeros(g_pad, N, dtype=torch.float16)
        d32 = torch.zeros(g_pad, N)
        repack_scales_kernel[(g_pad, triton.cdiv(N, 256))](src, d16, d32, N, K, src.shape[1], g, gclass, BLOCK=256)
        prepared.append(d32 if shape.wide_scales else d16)
    split = shape.kind == "splitk"
    per = -(-chunks // min(splits, chunks)) if split else chunks
    nsplit = -(-chunks // per) if split else 1
    tiles = -(-M // shape.block_m) * -(-N // shape.block_n)
    y = torch.full((M, N), float("nan"), dtype=torch.float16)
    part = torch.zeros(nsplit * M * N) if split else torch.zeros(1)
    counters = torch.zeros(tiles, dtype=torch.int32)
    b = bias if bias is not None else torch.zeros(N, dtype=torch.float16)
    cx = dict(GROUP_LOG2=gclass.bit_length() - 1, KC=kc, ONE_SCALE=gclass % kc == 0, EVEN_K=not generic,
              BM=shape.block_m, BN=shape.block_n, EPILOGUE=not split, GROUP_M=8, SWAP_AB=True, UNROLL=shape.unroll,
              PREFETCH=shape.prefetch, SCALE_AFTER=shape.scale_after, HAS_ZEROS=qw.zeros is not None, HAS_BIAS=True,
              ATOMIC=False, USE_ASM=False, DTYPE=tl.float16, EPI=0, PRO=False)
    # res_ptr and the norms' arguments None: the library's kernels are compiled with them as
    # constexprs (no parameter)
    w4a16_gemm_kernel[(tiles, nsplit)](x, qk, prepared[0], prepared[1], b, None, y, part, counters, M, N, K, chunks,
                                       per, nb, alpha, None, None, None, None, None, **cx)
    return y


@pytest.mark.parametrize("group_size,zeros,M,N,K,kernel,generic,splits", [
    (128, False, 3, 48, 256, "decode", False, 2),
    (256, True, 5, 32, 512, "splitk64", False, 3),
    (-1, True, 20, 64, 256, "tile128", False, 1),
    (-1, False, 2, 24, 200, "decode", True, 2),
    (64, True, 4, 32, 192, "decode", True, 2),
    (32, True, 6, 40, 160, "splitk64", True, 2),
    (32, False, 7, 16, 128, "tile256", False, 1),
    (64, False, 9, 32, 256, "tile128", False, 1),
])
def test_launch_semantics_interpreted(group_size, zeros, M, N, K, kernel, generic, splits):
    """The C launcher's choices (group class, regrouped scales, K padding, generic variants,
    split-K partials and counters, zero bias for NULL) give the reference result."""
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("runs the kernels in Triton's interpreter (CPU test sessions)")
    import w4a16

    torch.manual_seed(M * N + K)
    qw = w4a16.quantize(torch.randn(N, K) * 0.05, group_size, symmetric=not zeros, dtype=torch.float16)
    x = torch.randn(M, K).half()
    bias = (torch.randn(N) * 0.1).half() if M % 2 else None
    y = _emulate(x, qw, bias, 0.5, kernel, generic, splits)
    ref = w4a16.reference.gemm(x, qw, bias, 0.5)
    assert not torch.isnan(y).any()
    err = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert err <= 2e-3, err
