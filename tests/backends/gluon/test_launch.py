"""The Gluon launcher's direct path (pure Python, with a stand-in kernel): the first call of a
specialization compiles through ``kernel[grid](...)``, later ones call the compiled launcher
with the arguments and constexprs in signature order; hooks and failures take the generic path."""
import pytest
import torch

from w4a16.backends.gluon import host
from w4a16.backends.gluon.decode.config import GluonDecodeConfig


class FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def run(self, *a):
        if self.fail:
            raise TypeError("launcher signature differs")
        self.log.append(("direct", a))


class FakeKernel:
    def __init__(self, fail=False):
        self.log, self.fail = [], fail

    def __getitem__(self, grid):
        def launch_(*args, **kw):
            self.log.append(("generic", grid, args, kw))
            return FakeCompiled(self.log, self.fail)
        return launch_


X = torch.zeros(4)


def _args():
    return ("c", "x", "s", "o", X, X, X, X, 1, 64, 128, 8, 2, 1.0)


def _setup(monkeypatch):
    monkeypatch.setattr(host, "STATE", host.LaunchState())
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda i: 1234, raising=False)


def test_second_call_goes_straight_to_the_compiled_launcher(monkeypatch):
    _setup(monkeypatch)
    k, cfg = FakeKernel(), GluonDecodeConfig()
    cx = {"MT": 16, "W": 4}
    for _ in range(3):
        host.launch(k, (7, 2), _args(), cx, cfg, (cfg, 64, 4096, 0))
    kinds = [e[0] for e in k.log]
    assert kinds == ["generic", "direct", "direct"]
    compiled, grid = host.STATE.last               # what kernel_info reads
    assert isinstance(compiled, FakeCompiled) and grid == (7, 2)
    assert k.log[0][3] == {"num_warps": 4, "maxnreg": cfg.regs, "launch_pdl": True, "enable_fp_fusion": True, "MT": 16, "W": 4}
    grid_x, grid_y, grid_z, stream, fn, meta, lm, enter, exit_, *rest = k.log[1][1]
    assert (grid_x, grid_y, grid_z, stream, fn, meta) == (7, 2, 1, 1234, "fn", "meta")
    assert (lm, enter, exit_) == (None, None, None)
    expected = _args() + (16, 4)   # the arguments, then the constexprs in signature order
    assert len(rest) == len(expected) and all(a is b or a == b for a, b in zip(rest, expected))


def test_other_specializations_and_devices_compile_separately(monkeypatch):
    _setup(monkeypatch)
    k, cfg = FakeKernel(), GluonDecodeConfig()
    host.launch(k, (7, 2), _args(), {"MT": 16}, cfg, (cfg, 64, 4096, 0))
    host.launch(k, (7, 2), _args(), {"MT": 8}, cfg, (cfg, 64, 4096, 0))      # other constexprs
    host.launch(k, (7, 2), _args(), {"MT": 16}, cfg, (cfg, 64, 4096, 1))     # not the current device
    assert [e[0] for e in k.log] == ["generic", "generic", "generic"]


def test_a_failing_direct_launch_falls_back_for_good(monkeypatch):
    _setup(monkeypatch)
    k, cfg = FakeKernel(fail=True), GluonDecodeConfig()
    for _ in range(3):
        host.launch(k, (7, 2), _args(), {"MT": 16}, cfg, (cfg, 64, 4096, 0))
    assert [e[0] for e in k.log] == ["generic", "generic", "generic"] and host.STATE.direct is False and "signature differs" in host.STATE.error


def _fake_compiled(launch, listed):
    from types import SimpleNamespace
    run = SimpleNamespace(launch=launch, global_scratch_size=0, profile_scratch_size=0, launch_cooperative_grid=False,
                          launch_pdl=True)
    if listed:
        run.arg_annotations, run.kernel_signature = "annotations", "signature"
    return SimpleNamespace(run=run)


@pytest.mark.parametrize("listed", [False, True], ids=["3.6-launcher", "3.7-launcher"])
def test_direct_launcher_reads_tritons_wrapper(listed):
    """The bound decode launch reads the C launcher and descriptor metadata out of the installed
    Triton's descriptor wrapper and calls the launcher as that release's Python side does (3.6: the
    kernel's own module, arguments spread; 3.7 on: utils.launch, the arguments in one list); this
    fails if Triton's wrapper stops closing over them."""
    from triton.backends.nvidia.driver import wrap_handle_tensordesc

    from w4a16.backends.triton_compat import direct_launcher

    calls = []

    def c_launcher(*a):
        calls.append(a)
    sig = {"a": "tensordesc<u8[4, 8, 256]>", "b": "tensordesc<fp16[16, 64]>", "c": "tensordesc<fp16[1, 64]>",
           "d": "tensordesc<fp16[1, 64]>", "y": "*fp16", "M": "i32"}
    meta = [dict(swizzle=0, elem_size=1, elem_type=0, block_size=[4, 8, 256], fp4_padded=False)] + \
        [dict(swizzle=0, elem_size=2, elem_type=1, block_size=[1, 64], fp4_padded=False)] * 3
    d = direct_launcher(_fake_compiled(wrap_handle_tensordesc(c_launcher, sig, meta), listed), 4)
    assert d is not None and d.meta == meta
    d.launch(7, 2, 99, "fn", "md", ["descs...", "y", 5])
    if listed:
        assert calls == [(7, 2, 1, 99, "fn", False, True, "md", None, None, None, None, None, "annotations",
                          "signature", ["descs...", "y", 5])]
    else:
        assert calls == [(7, 2, 1, 99, "fn", False, True, None, None, "md", None, None, None, "descs...", "y", 5)]
    assert direct_launcher(_fake_compiled(c_launcher, listed), 4) is None
    assert direct_launcher(_fake_compiled(wrap_handle_tensordesc(c_launcher, sig, meta), listed), 3) is None
    scratch = _fake_compiled(wrap_handle_tensordesc(c_launcher, sig, meta), listed)
    scratch.run.global_scratch_size = 64
    assert direct_launcher(scratch, 4) is None



def test_bound_decode_takes_the_bind_call_shape():
    """``w4a16.gemm`` calls a bound launch as ``Backend.bind`` documents it, run(x2, bias, residual,
    norm, input_norm): the Gluon decode launch must accept that call (the norms are always None)."""
    import inspect

    from w4a16.backends.gluon.decode.bound import BoundDecode

    inspect.signature(BoundDecode.__call__).bind(object(), "x2", "bias", "residual", None, None)
