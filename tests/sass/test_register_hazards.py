"""w4a16.sass.disasm.register_operand_hazards: writes to registers an issued wgmma (HGMMA) reads
as its A operand before a ``WARPGROUP.DEPBAR`` covers it, on hand-written SASS and on real sm_90a
builds; and GemmConfig.for_wgmma, which keeps the Triton kernel's Hopper launches clear of them."""
import pytest

from w4a16.backends.triton.config import NAMED_CONFIGS, GemmConfig
from w4a16.sass.disasm import register_operand_hazards

ISSUE = [(0x100, "WARPGROUP.ARRIVE", "WARPGROUP.ARRIVE"),
         (0x110, "HGMMA.64x64x16.F32", "HGMMA.64x64x16.F32 R24, R56, gdesc[UR16], R24"),
         (0x120, "HGMMA.64x64x16.F32", "HGMMA.64x64x16.F32 R24, R60, gdesc[UR16], R24, gsb0")]
WAIT = [(0x130, "WARPGROUP.DEPBAR.LE", "WARPGROUP.DEPBAR.LE gsb0, 0x0")]


def test_a_write_at_the_next_iteration_start_before_any_wait_is_found():
    """The loop's first instruction rewrites R57 while the last iteration's HGMMA may still read it."""
    ins = [(0x0f0, "LEA", "LEA R57, P3, R134, UR9, 0x1")] + ISSUE + [(0x200, "BRA", "@P3 BRA 0xf0")]
    (hz,) = register_operand_hazards(ins)
    assert "reads R57" in hz and "0x110" in hz and "LEA R57" in hz


def test_a_wait_before_the_write_clears_it():
    ins = [(0x0f0, "LEA", "LEA R57, P3, R134, UR9, 0x1")] + ISSUE + WAIT + [(0x200, "BRA", "@P3 BRA 0xf0")]
    assert register_operand_hazards(ins) == []


def test_wide_writes_and_kept_groups():
    """An LDS.128 writes four registers; ``DEPBAR.LE gsb0, 0x1`` leaves the newest group pending."""
    lds = [(0x140, "LDS.128", "LDS.128 R60, [R5+UR4+0x20000]")]
    ins = ISSUE + [(0x130, "WARPGROUP.DEPBAR.LE", "WARPGROUP.DEPBAR.LE gsb0, 0x1")] + lds
    assert len(register_operand_hazards(ins)) == 4          # R60..R63 of the pending group
    assert register_operand_hazards(ISSUE + WAIT + lds) == []


def test_an_hgmma_reading_a_from_shared_memory_has_no_register_operand():
    ins = [(0x110, "HGMMA.64x64x16.F32", "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24, gsb0"),
           (0x120, "MOV", "MOV R56, RZ")]
    assert register_operand_hazards(ins) == []


def test_for_wgmma_unswaps_only_pipelined_swapped_tiles_with_scales_before_the_mma():
    hazardous = GemmConfig("tile", 128, 64, num_warps=4, num_stages=4)
    assert hazardous.for_wgmma() == GemmConfig("tile", 128, 64, num_warps=4, num_stages=4, swap_ab=False)
    for kept in (GemmConfig("tile", 128, 64, num_warps=4, num_stages=1),
                 GemmConfig("tile", 128, 64, num_warps=4, num_stages=4, scale_after=True),
                 GemmConfig("tile", 128, 64, num_warps=4, num_stages=4, swap_ab=False),
                 NAMED_CONFIGS["decode"], NAMED_CONFIGS["64"]):
        assert kept.for_wgmma() is kept
    assert NAMED_CONFIGS["128"].for_wgmma().swap_ab is False
    wide = GemmConfig("tile", 256, 128, num_warps=8, num_stages=3).for_wgmma()   # unswapped 256-row tiles: 2 stages
    assert (wide.swap_ab, wide.num_stages) == (False, 2)


def _ptxas_12() -> bool:
    from w4a16.backends.triton_compat import sm90_ptxas

    return sm90_ptxas().startswith("12.")


def test_real_builds_the_package_ships_have_none_and_the_refused_moe_tile_has_some():
    """sm_90a builds on this machine's Triton (worker processes, as ``w4a16 sass`` runs them): the
    named tile config as a Hopper launch runs it and the MoE kernel's shipped prefill down tiles
    are clear; the tile the MoE kernel refuses (swapped, scales before the MMA, pipelined) rewrites
    wgmma registers wherever sm_90 is compiled with a 12.x ptxas (Triton 3.6 to 3.8; 3.9's default
    13.4 waits)."""
    from w4a16.backends.triton.moe import MoeKernel
    from w4a16.backends.triton.moe_packed import PackedTile, packed_tile_for
    from w4a16.sass.report import run_cases
    from w4a16.sass.shipped import KernelCase

    cases = [KernelCase("triton", NAMED_CONFIGS["128"].for_wgmma(), "fp16")]
    cases += [KernelCase("triton-moe", MoeKernel(packed_tile_for(bm, 4096, False), bm, False), "fp16") for bm in (64, 128)]
    cases += [KernelCase("triton-moe", MoeKernel(PackedTile(128, True, False, 8, 3), 64, False), "fp16")]
    *shipped, refused = run_cases(cases, jobs=2)
    assert all(r.error is None and r.register_hazards == 0 for r in shipped), [(r.label, r.error) for r in shipped]
    assert refused.error is None
    if _ptxas_12():
        assert refused.register_hazards > 0
    else:
        pytest.skip(f"this Triton's ptxas for sm_90 waits before reusing wgmma registers "
                    f"({refused.register_hazards} writes)")
