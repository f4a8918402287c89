"""w4a16.sass: the shipped configs, the judgement of a build against a baseline and the allowances,
and a few real compiles for sm_90a (no GPU needed)."""
import json

import pytest

from w4a16.sass.allowances import ALLOWANCES, allowance_for
from w4a16.sass.report import CaseResult, judge, run_cases, to_json
from w4a16.sass.shipped import KERNELS, KernelCase, shipped_cases


def _result(key="gluon-decode g8x64c4s3ws fp16 g128", kernel="gluon-decode", label="g8x64c4s3ws", **kw):
    r = CaseResult(key, kernel, label, "fp16", "g128", registers=80, shared_bytes=1024, hgmma=32,
                   instructions=kw.pop("instructions", 469), uniform=60, weights_per_thread=256)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def _baseline(*results):
    return to_json(list(results), "3.6.0")


def test_shipped_cases_cover_every_kernel_and_named_config():
    from w4a16.backends.gluon.decode.config import NAMED
    from w4a16.backends.gluon.prefill.config import NAMED as PREFILL
    from w4a16.backends.triton.config import NAMED_CONFIGS
    cases = shipped_cases()
    keys = [c.key for c in cases]
    assert len(keys) == len(set(keys))
    assert {c.kernel for c in cases} == set(KERNELS)
    labels = {(c.kernel, c.label, c.dtype) for c in cases}
    for cfgs, kernel in ((NAMED, "gluon-decode"), (PREFILL, "gluon-prefill"), (NAMED_CONFIGS, "triton")):
        for cfg in cfgs.values():
            cfg = cfg.for_wgmma() if kernel == "triton" else cfg      # as a Hopper launch runs it
            assert (kernel, cfg.short(), "fp16") in labels and (kernel, cfg.short(), "bf16") in labels
    assert {c.group for c in cases} == {32, 64, 128, 256, -1} and any(c.zeros for c in cases)


def test_shipped_cases_hold_the_moe_kernels_heuristic_tiles():
    """Both grouped kernels: every block size (16, 64, 128; gate_up and down; the one-token variant at
    16) in both dtypes, and a decode gate_up tile over every group size; the plain kernel's tiles
    are its heuristic's, and every tile the packed kernel's rule can pick is compiled."""
    from w4a16.backends.triton.moe import MoeTile, tile_for
    from w4a16.backends.triton.moe_packed import PackedTile, packed_tile_for

    cases = shipped_cases(kernels=("triton-moe",))
    for kind in (MoeTile, PackedTile):
        mine = [c for c in cases if isinstance(c.config.tile, kind)]
        got = {(c.config.block_m, c.config.silu_mul, c.config.direct, c.dtype) for c in mine if c.group == 128
               and not c.zeros}
        assert got == {(bm, s, d, dt) for bm in (16, 64, 128) for s in (True, False) for d in (False, True)
                       for dt in ("fp16", "bf16") if not (d and bm != 16)}
        assert {c.group for c in mine} == {32, 64, 128, 256, -1}
    plain = [c for c in cases if isinstance(c.config.tile, MoeTile)]
    assert all(c.config.tile == tile_for(c.config.block_m, c.config.silu_mul, c.group, c.group == -1) for c in plain)
    packed = {c.config.tile for c in cases if isinstance(c.config.tile, PackedTile)}
    picks = {packed_tile_for(bm, n, silu, blocks) for bm in (16, 64, 128) for n in (16, 32, 256, 768, 2048, 4096, 14336)
             for silu in (True, False) for blocks in (None, 1, 2, 8, 128)}
    assert picks <= packed, picks - packed          # every tile the packed rule can pick


def test_shipped_cases_respect_the_filters():
    cases = shipped_cases(("bf16",), ("triton",))
    assert cases and all(c.kernel == "triton" and c.dtype == "bf16" for c in cases)


def test_a_clean_build_passes():
    r = _result()
    assert judge([r], (3, 6), _baseline(_result())) == [] and not r.failures and not r.allowed


def test_growth_beyond_the_tolerance_fails_without_an_allowance():
    r = _result(instructions=500)                      # +6.6% over 469
    judge([r], (3, 7), _baseline(_result()), 0.05)
    assert r.failures and "+6.6% > 5%" in r.failures[0] and not r.allowed
    r = _result(instructions=490)                      # +4.5%
    judge([r], (3, 7), _baseline(_result()), 0.05)
    assert not r.failures


def test_an_allowance_accepts_only_its_release_and_bound():
    rule = allowance_for((3, 9), "gluon-decode", "g8x64c4s3ws")
    assert rule is not None and rule.why
    within = _result(instructions=int(469 * (1 + rule.growth)) - 1)
    judge([within], (3, 9), _baseline(_result()))
    assert not within.failures and within.allowed
    beyond = _result(instructions=int(469 * (1 + rule.growth)) + 5)
    judge([beyond], (3, 9), _baseline(_result()))
    assert beyond.failures
    other_release = _result(instructions=500)
    judge([other_release], (3, 10), _baseline(_result()))
    assert other_release.failures


def test_spills_fail_unless_allowed():
    r = _result(spills=4)
    judge([r], (3, 6))
    assert r.failures == ["4 spill instructions"]
    sk = _result(key="gluon-decode g16x64c2s4wssk fp16 g128", label="g16x64c2s4wssk", spills=8)
    judge([sk], (3, 9))
    assert not sk.failures and sk.allowed == ["8 spill instructions"]
    plain = _result(spills=8)                           # not a stream-K config: no rule for its spills
    judge([plain], (3, 9))
    assert plain.failures


def test_errors_waits_and_missing_loops_fail():
    broken = CaseResult("triton x fp16 g128", "triton", "x", "fp16", "g128", error="CompilationError: boom")
    waits = _result(wait_between_hgmma=True)
    no_loop = _result(instructions=0)
    judge([broken, waits, no_loop], (3, 6))
    assert broken.failures == ["does not compile"]
    assert waits.failures == ["a wgmma wait between two HGMMAs"]
    assert no_loop.failures == ["no main loop found"]


def test_register_hazards_fail_even_where_an_allowance_would_accept_growth():
    r = _result(key="triton-moe x fp16 g128", kernel="triton-moe", label="moe-packed-down m64 n128 w8 s3",
                register_hazards=3)
    judge([r], (3, 9))
    assert r.failures == ["3 writes to registers an issued wgmma reads before its wait"]


def test_cases_missing_from_the_baseline_are_listed():
    r = _result(key="gluon-decode new fp16 g128")
    assert judge([r], (3, 6), _baseline(_result())) == ["gluon-decode new fp16 g128"]


def test_every_allowance_is_explained_and_bounded():
    for a in ALLOWANCES:
        assert a.kernel in KERNELS and a.why and 0 < a.growth < 0.25
        assert a.spills <= 16 or (a.loop_spills is not None and a.spills <= 64 and a.loop_spills <= 2)


def test_spills_pass_only_where_a_rule_bounds_them_in_and_out_of_the_main_loop():
    label = "moe-packed-down m128 n128 sa w8 s3"
    outside = _result(key="triton-moe w bf16 g128", kernel="triton-moe", label=label, spills=48)
    inside = _result(key="triton-moe w fp16 g128", kernel="triton-moe", label=label, spills=48, loop_spills=2)
    other = _result(key="triton-moe o bf16 g128", kernel="triton-moe", label="moe-packed-down m64 n128 sa w8 s3",
                    spills=48)
    judge([outside, inside, other], (3, 6))
    assert not outside.failures and outside.allowed == ["48 spill instructions"]
    assert inside.failures == ["48 spill instructions (2 in the main loop)"]
    assert other.failures == ["48 spill instructions"]
    newer = _result(key="triton-moe w bf16 g128", kernel="triton-moe", label=label, spills=38, loop_spills=2)
    judge([newer], (3, 9))                            # that release's rule bounds the loop's spills at 2
    assert not newer.failures
    newer.loop_spills = 4
    judge([newer], (3, 9))
    assert newer.failures == ["38 spill instructions (4 in the main loop)"]


def test_json_round_trip(tmp_path):
    from w4a16.sass.report import write_json
    path = tmp_path / "b.json"
    write_json(str(path), _baseline(_result()))
    data = json.loads(path.read_text())
    assert data["triton"] == "3.6.0" and data["cases"]["gluon-decode g8x64c4s3ws fp16 g128"]["instructions"] == 469


@pytest.mark.parametrize("kernel,pick,hgmma", [("gluon-decode", "g16x64c2s4ws", 4), ("gluon-prefill", "p64x64x2c2s4pp", 4),
                                               ("triton", "splitk 16x64 k8 w4 s1 sa", 4),
                                               ("triton-moe", "moe-down m64 n128 k64 w4 s3", 4),
                                               ("triton-moe", "moe-gate_up m16 n32 k128 w4 s3 direct", 0)])
def test_real_compiles(kernel, pick, hgmma):
    """One shipped config of each kernel compiled in a worker process (as ``w4a16 sass`` does):
    spill-free, a main loop (with HGMMAs where the tile has 64 rows or more), instructions per
    weight in the range the kernels reach."""
    case = next(c for c in shipped_cases(("fp16",), (kernel,)) if c.label == pick and c.group == 128)
    (r,) = run_cases([case], jobs=1)
    judge([r], (3, 6))
    assert not r.failures, (r.failures, r.error)
    assert r.registers and r.hgmma >= hgmma and 1.0 < r.per_weight < 6.0 and r.vector_per_weight <= r.per_weight


def test_cli_with_a_baseline(tmp_path, monkeypatch, capsys):
    """``w4a16 sass`` over a small set: a JSON, then the same build against it (exit 0), then a
    baseline that claims fewer instructions (exit 1, the case named)."""
    from w4a16 import cli
    from w4a16.sass import shipped
    small = [c for c in shipped_cases(("fp16",), ("gluon-decode",)) if c.label == "g16x64c2s4ws" and c.group == 128]
    monkeypatch.setattr(shipped, "shipped_cases", lambda dtypes, kernels: small)
    out = tmp_path / "base.json"
    assert cli.main(["sass", "--kernels", "gluon-decode", "--dtype", "fp16", "--json", str(out), "--jobs", "1"]) == 0
    assert cli.main(["sass", "--kernels", "gluon-decode", "--dtype", "fp16", "--baseline", str(out), "--jobs", "1"]) == 0
    data = json.loads(out.read_text())
    for v in data["cases"].values():
        v["instructions"] = int(v["instructions"] * 0.8)
    out.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(["sass", "--kernels", "gluon-decode", "--dtype", "fp16", "--baseline", str(out), "--jobs", "1"]) == 1
    assert "FAIL gluon-decode g16x64c2s4ws fp16 g128" in capsys.readouterr().out


def test_cli_rejects_an_unknown_kernel():
    from w4a16 import cli
    from w4a16.errors import W4A16Error
    with pytest.raises(W4A16Error, match="--kernels"):
        cli.main(["sass", "--kernels", "cutlass"])
