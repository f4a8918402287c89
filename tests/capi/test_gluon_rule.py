"""The C library's Gluon side on a machine without a GPU: the Gluon kernel table in the order the C
side indexes it, the Gluon layout's sizes and group classes, launch plans that follow the Python
launchers' rules (w4a16/backends/gluon/launch.py, prefill_config.py), and the Gluon repack kernels
equal to the Python layout byte for byte (Triton interpreter)."""
import os

import pytest
import torch

from w4a16.backends.gluon.decode.config import auto_splits
from w4a16.backends.gluon.host import k_ranges
from w4a16.capi import gluon_variants as gv
from w4a16.capi.loader import gluon_applies

from test_build import needs_cuda_h, needs_gcc, run_probe

SMS = 132


def _expected_decode(M, N, K, group):
    """(variant name, splits, stages per split) the Python launcher's rules give the C library's decode config."""
    mt = next(t for t in gv.DECODE_TILES if M <= t)
    gc = 32 if group == 32 else 64 if group == 64 else 128 if group == 128 else 256
    v = gv.GluonVariant(f"decode{mt}", gc, "fp16", False)   # the whole build: the same pipeline
    cfg = v.decode_config()
    kh = 32 if gc == 32 else 64
    ks = cfg.nch * 2 * kh
    n_tiles, n_stages = -(-N // 64), -(-K // ks)
    splits = auto_splits(n_tiles, n_stages, SMS * cfg.resident(kh, False), 16.0 * mt / ks)
    sps, splits = k_ranges(n_stages, splits)
    name = v.name.replace(f"decode{mt}_", f"decode{mt}k_") if splits > 1 else v.name
    return name, splits, sps


DECODE_CASES = [(1, 4096, 4096, 128), (16, 28672, 8192, 128), (64, 8192, 28672, 128), (3, 1024, 4096, 32),
                (9, 6144, 1024, 64), (30, 2048, 2048, 256)]


@needs_gcc
@needs_cuda_h
def test_gluon_table_layout_and_plans(built_capi, tmp_path):
    names = "\n".join(
        f'    if (strcmp(w4a16_cubins[W4A16_GEN_GLUON_FIRST + gluon_index({gv.CONFIGS.index(v.config)}, '
        f'&(layout_t){{.gluon_class = {gv.GROUP_CLASSES.index(v.group_class)}, .dtype = {gv.DTYPES.index(v.dtype)}, '
        f'.has_zeros = {int(v.zeros)}}})].name, "{v.name}")) bad++;'
        for v in gv.gluon_variants())
    # the Python mirror of the C rule (loader.gluon_applies, used by the GPU tests) against gluon_class
    rule = "\n".join(
        f"    if ((gluon_class({N}, {K}, {K if g == -1 else g}) >= 0) != {int(gluon_applies(1, N, K, g))}) bad += 50;"
        for N in (16, 72, 256) for K in (64, 96, 100, 200, 512, 768, 2048)
        for g in (-1, 32, 64, 96, 128, 256, 512) if g == -1 or K % g == 0)
    plans = []
    for i, (M, N, K, g) in enumerate(DECODE_CASES):
        name, splits, sps = _expected_decode(M, N, K, g)
        plans.append(f"""
            make_gluon_layout({N}, {K}, {g}, 0, 0, &L);
            if (make_gluon_plan(0, NULL, &L, {M}, {SMS}, (size_t)1 << 40, &p) || !p.decode || p.splits != {splits} ||
                p.sps != {sps} || strcmp(w4a16_cubins[W4A16_GEN_GLUON_FIRST + p.variant].name, "{name}")) {{
                printf("decode case {i}: splits %d sps %d %s\\n", p.splits, p.sps,
                       w4a16_cubins[W4A16_GEN_GLUON_FIRST + p.variant].name);
                bad += 1000;
            }}""")
    code = f"""
        #include "w4a16_sm90_kernel.c"
        int main(void) {{
            int bad = 0;
            layout_t L;
            gluon_plan_t p;
        {names}
        {rule}
            if (gluon_class(72, 576, 64) != -1 || gluon_class(256, 100, 100) != -1 || gluon_class(256, 768, 96) != -1)
                bad += 10;
            if (gluon_class(256, 512, 256) != 3 || gluon_class(256, 200, 200) != 3 || gluon_class(256, 96, 96) != -1 ||
                gluon_class(256, 64, 64) != 1 || gluon_class(256, 1024, 32) != 0 || gluon_class(256, 2048, 512) != 3)
                bad += 20;
            /* N = K = 4096, g = 128, zero points: codes 256 blocks x 4096 x 8 bytes, scales and offsets 32 x 4096 x 2 */
            if (make_gluon_layout(4096, 4096, 128, 0, 1, &L) || L.kind != LAYOUT_GLUON || L.kh != 64 || L.k_pad != 4096 ||
                L.off_s != 8388608 || L.off_z != 8388608 + 262144 || L.off_bias != 8388608 + 2 * 262144 ||
                L.total != 8388608 + 2 * 262144 + 8192)
                bad += 100;
            if (make_gluon_layout(64, 96, 32, 0, 0, &L) || L.kh != 32 || L.k_pad != 128 || L.n_src_groups != 3) bad += 200;
            if (make_gluon_layout(72, 576, 64, 0, 0, &L) != W4A16_ERROR_NOT_SUPPORTED) bad += 300;
        {"".join(plans)}
            /* prefill: 64-token tiles while they make at most one wave, else 128 x 256 (_128) / 128 x 128 (_64) */
            make_gluon_layout(1024, 512, 128, 0, 0, &L);
            make_gluon_plan(0, NULL, &L, 300, 132, 0, &p);
            if (p.decode || strcmp(gluon_config_names[p.variant / 16], "prefill-64")) bad += 2000;
            make_gluon_plan(0, NULL, &L, 1100, 132, 0, &p);
            if (strcmp(gluon_config_names[p.variant / 16], "prefill-128x128") || p.rows != 1100) bad += 2100;
            make_gluon_plan(1, NULL, &L, 1100, 132, 0, &p);
            if (strcmp(gluon_config_names[p.variant / 16], "prefill-128")) bad += 2200;
            /* the workspace bounds the K splits; none at all runs unsplit */
            make_gluon_layout(4096, 4096, 128, 0, 0, &L);
            make_gluon_plan(0, NULL, &L, 1, 132, 0, &p);
            if (p.splits != 1 || p.need != 0) bad += 3000;
            make_gluon_plan(0, NULL, &L, 16, 132, 100000, &p);
            if (p.splits < 1 || p.need > 100000) bad += 3100;
            w4a16_gemm_config cfg = {{W4A16_KERNEL_GLUON_DECODE, 5, W4A16_FLAG_ZEROED_WORKSPACE, {{0}}}};
            make_gluon_plan(0, &cfg, &L, 16, 132, (size_t)1 << 30, &p);
            if (p.splits != 4 || p.sps != 4 || !p.zeroed || p.need != ALIGN + p.part_bytes + W4A16_COUNTER_REGION_BYTES ||
                strcmp(gluon_config_names[p.variant / 16], "decode16k"))
                bad += 3200;   /* 16 stages in ranges of 4: 4 splits, the K-split build */
            cfg.flags = 0;     /* the library's own counters: partials only */
            make_gluon_plan(0, &cfg, &L, 16, 132, (size_t)1 << 30, &p);
            if (!p.own_counters || p.zeroed || p.need != ALIGN + p.part_bytes) bad += 3250;
            cfg.split_k = 1;   /* one range: the whole build, no workspace */
            make_gluon_plan(0, &cfg, &L, 16, 132, 0, &p);
            if (p.splits != 1 || p.need != 0 || strcmp(gluon_config_names[p.variant / 16], "decode16")) bad += 3270;
            if (make_gluon_plan(0, &cfg, &L, 65, 132, 0, &p) != W4A16_ERROR_INVALID_VALUE) bad += 3300;
            cfg.kernel = W4A16_KERNEL_TILE128;
            if (make_gluon_plan(0, &cfg, &L, 16, 132, 0, &p) != W4A16_ERROR_NOT_SUPPORTED) bad += 3400;
            if (W4A16_GEN_NUM_GLUON != {len(gv.gluon_variants())}) bad += 5000;
            printf("%d\\n", bad);
            return bad != 0;
        }}
    """
    r = run_probe(built_capi, tmp_path, "probe_gluon.c", code)
    assert r.returncode == 0, f"probe: {r.stdout}{r.stderr}"


def test_gluon_applies_examples():
    assert gluon_applies(1, 4096, 4096, 128) and gluon_applies(5, 256, 200, -1) and gluon_applies(5, 256, 1024, 512)
    assert not gluon_applies(1, 72, 576, 64) and not gluon_applies(1, 256, 768, 96)
    assert not gluon_applies(1, 256, 96, -1) and not gluon_applies(1, 256, 100, -1)


@pytest.mark.parametrize("N,K,g,dtype,zeros", [(40, 256, 32, torch.float16, True), (16, 128, 128, torch.bfloat16, False),
                                               (33, 384, 64, torch.float16, True), (20, 200, -1, torch.float16, True),
                                               (48, 512, 256, torch.float16, False)])
def test_gluon_repack_kernels_match_layout(N, K, g, dtype, zeros):
    """The Gluon repack kernels (interpreted on the CPU) produce ``prepare_decode``'s bytes exactly,
    on random codes, scales and zero points, into poisoned outputs."""
    if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from w4a16.backends.gluon.layout import prepare_decode
    from w4a16.capi.repack_gluon import repack_gluon_codes_kernel, repack_gluon_params_kernel
    from w4a16.pack import pack_nibbles

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(N * K)
    geff = K if g == -1 else g
    G = K // geff
    qw = pack_nibbles(torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)).to(dev)
    s = (torch.rand(N, G, generator=gen) * 0.01 + 0.005).to(dtype).to(dev)
    z = (torch.rand(N, G, generator=gen) * 15).to(dtype).to(dev) if zeros else None
    ref = prepare_decode(qw, s, z, geff)
    kh, nb = ref.kh, -(-N // 16)
    chunks = ref.K_pad // (2 * kh)
    codes = torch.full((nb, chunks * 16 * kh), 0xAB, dtype=torch.uint8, device=dev)
    repack_gluon_codes_kernel[(nb, chunks)](qw, codes, N, K, chunks, KH=kh)
    assert torch.equal(codes.view(-1), ref.codes.reshape(-1))
    n8 = -(-N // 8) * 8
    st = torch.full((G, n8), float("nan"), dtype=dtype, device=dev)
    ot = torch.full((G, n8), float("nan"), dtype=dtype, device=dev)
    repack_gluon_params_kernel[(G, -(-n8 // 64))](s, z if zeros else s, st, ot, N, G, n8, HAS_ZEROS=zeros, BLOCK=64)
    assert torch.equal(st, ref.scales_t)
    if zeros:
        assert torch.equal(ot, ref.offs_t)
