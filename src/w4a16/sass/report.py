"""``w4a16 sass``: compile every shipped kernel config for sm_90a with the installed Triton, report
each one's resources and main-loop SASS, and compare with a baseline build.

A case fails when it does not compile, spills, has ptxas serialize two HGMMAs with a wait (Gluon
kernels), or, against a baseline, spends more SASS instructions per weight in its main loop than
the baseline's by more than the tolerance, unless a rule of ``allowances.py`` accepts the spills
or the growth for this Triton release (the result then says so).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from ..backends.triton.env import interpreter_unset
from ..epilogue import code_of
from . import disasm
from .allowances import allowance_for
from .shipped import PER_CHANNEL_K, KernelCase


@dataclass
class CaseResult:
    """What one case compiled to (``error`` set instead when it did not compile). ``failures``
    and ``allowed`` (departures a rule of allowances.py accepts) are filled by :func:`judge`."""
    key: str
    kernel: str
    label: str
    dtype: str
    weights: str                 # "g128", "pc zeros", ...
    registers: Optional[int] = None
    spills: int = 0
    shared_bytes: int = 0
    hgmma: int = 0
    instructions: int = 0        # main loop
    uniform: int = 0             # of which on the uniform datapath
    weights_per_thread: int = 0
    wait_between_hgmma: bool = False
    loop_spills: int = 0         # of the spills, those inside the main loop
    register_hazards: int = 0    # writes to an in-flight wgmma's register operands (disasm.register_operand_hazards)
    digest: str = ""             # the whole kernel's SASS (disasm.digest)
    error: Optional[str] = None
    failures: List[str] = field(default_factory=list)
    allowed: List[str] = field(default_factory=list)

    @property
    def per_weight(self) -> Optional[float]:
        return self.instructions / self.weights_per_thread if self.weights_per_thread else None

    @property
    def vector_per_weight(self) -> Optional[float]:
        return (self.instructions - self.uniform) / self.weights_per_thread if self.weights_per_thread else None


def _compile(case: KernelCase):
    """(compiled kernel, weights per thread per main-loop iteration, the main loop's opcodes)."""
    import torch
    group = PER_CHANNEL_K if case.group == -1 else case.group
    dtype = torch.float16 if case.dtype == "fp16" else torch.bfloat16
    if case.kernel == "triton-attention":
        from ..backends.triton.offline import attention_elements_per_thread, compile_decode_attention
        return compile_decode_attention(case.config, case.dtype), attention_elements_per_thread(case.config), None
    if case.kernel == "triton-moe":
        from ..backends.triton.offline import compile_moe, moe_weights_per_thread
        return (compile_moe(case.config, case.dtype, case.group, case.zeros),
                moe_weights_per_thread(case.config, case.group), None)
    if case.kernel == "triton":
        from ..backends.triton.offline import compile_gemm, weights_per_thread
        k = compile_gemm(case.config, case.dtype, case.group, case.zeros,
                         epilogue=case.config.kind == "tile" or case.config.split_k == 1, epi=code_of(case.epilogue),
                         input_norm=case.input_norm)
        return k, weights_per_thread(case.config, case.group), None
    from ..backends.gluon import offline
    if case.kernel == "gluon-moe":
        k = offline.compile_moe_decode(case.config.gate_up, dtype, group, case.config.split)
        return k, offline.moe_decode_weights_per_thread(case.config.gate_up, group), None
    if case.kernel == "gluon-decode":
        k = offline.compile_decode(case.config, dtype, case.zeros, group, has_bias=True, split_mode=1,
                                   epi=code_of(case.epilogue))
        return k, offline.decode_weights_per_thread(case.config, group), None
    k = offline.compile_prefill(case.config, dtype, case.zeros, group, has_bias=True)
    return k, offline.prefill_weights_per_thread(case.config, group), offline.prefill_loops


def run_case(case: KernelCase) -> CaseResult:
    """Compile one case and read its SASS; never raises (a failure is in the result)."""
    g = "pc" if case.group == -1 else f"g{case.group}"
    r = CaseResult(case.key, case.kernel, case.label, case.dtype,
                   g + (" zeros" if case.zeros else "") + (f" {case.epilogue}" if case.epilogue else "")
                   + (" input_norm" if case.input_norm else ""))
    try:
        k, wpt, find_loops = _compile(case)
    except Exception as e:  # a kernel that does not compile is this command's finding, not a crash
        r.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return r
    ins = disasm.instructions(k.asm["cubin"])
    if find_loops is None:
        body = disasm.hgmma_loop(ins)
    else:   # the prefill kernel: one K loop per consumer warpgroup; the longer counts
        body = max(find_loops(ins) or [[]], key=len)
    loop = disasm.loop_stats(body, wpt)
    r.registers = disasm.registers(k.asm["cubin"])
    r.spills, r.loop_spills = disasm.spills(ins), loop.spills
    r.shared_bytes = int(k.metadata.shared)
    r.hgmma, r.instructions, r.uniform = loop.hgmma, loop.instructions, loop.uniform
    r.weights_per_thread, r.wait_between_hgmma = wpt, loop.wait_between_hgmma
    r.register_hazards = len(disasm.register_operand_hazards(ins))
    r.digest = disasm.digest(ins)
    return r


def run_cases(cases: Iterable[KernelCase], jobs: int = 0, progress=None) -> List[CaseResult]:
    """Every case compiled in ``jobs`` worker processes (0: one per CPU); results in the order
    given. ``progress``: called with each result as it arrives."""
    cases = list(cases)
    jobs = jobs or os.cpu_count() or 1
    results: Dict[int, CaseResult] = {}
    # Fresh processes without TRITON_INTERPRET: Triton decides when a kernel module is imported
    # whether its kernels are interpreted, and an interpreted kernel cannot be compiled.
    with interpreter_unset(), cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {ex.submit(run_case, c): i for i, c in enumerate(cases)}
        for f in cf.as_completed(futs):
            results[futs[f]] = f.result()
            if progress:
                progress(results[futs[f]])
    return [results[i] for i in range(len(cases))]


def judge(results: List[CaseResult], release: Tuple[int, int], baseline: Optional[dict] = None,
          tolerance: float = 0.05) -> List[str]:
    """Fill each result's ``failures`` and ``allowed``: no compile, spills, a wgmma wait between two
    HGMMAs (Gluon kernels), a register an issued wgmma reads rewritten before its wait, no main
    loop, and with a baseline more than ``tolerance`` (a fraction) growth of instructions per
    weight; spills and growth that a rule for ``release`` accepts go to ``allowed``. Returns the
    keys the baseline lacks (not compared)."""
    base = (baseline or {}).get("cases", {})
    missing = []
    for r in results:
        r.failures, r.allowed = [], []
        if r.error:
            r.failures.append("does not compile")
            continue
        rule = allowance_for(release, r.kernel, r.label)
        if r.spills:
            in_loop_ok = rule is not None and (rule.loop_spills is None or r.loop_spills <= rule.loop_spills)
            if rule and r.spills <= rule.spills and in_loop_ok:
                r.allowed.append(f"{r.spills} spill instructions")
            else:
                where = f" ({r.loop_spills} in the main loop)" if r.loop_spills else ""
                r.failures.append(f"{r.spills} spill instructions{where}")
        if not r.kernel.startswith("triton") and r.wait_between_hgmma:
            r.failures.append("a wgmma wait between two HGMMAs")
        if r.register_hazards:   # undefined behaviour: never allowed
            r.failures.append(f"{r.register_hazards} writes to registers an issued wgmma reads before its wait")
        if not r.weights_per_thread or not r.instructions:
            r.failures.append("no main loop found")
        if baseline is None:
            continue
        b = base.get(r.key)
        if b is None or not b.get("weights_per_thread") or b.get("error") or r.per_weight is None:
            missing.append(r.key)
            continue
        ref = b["instructions"] / b["weights_per_thread"]
        growth = r.per_weight / ref - 1
        if growth > tolerance:
            text = (f"{r.per_weight:.3f} instructions per weight, baseline {ref:.3f} "
                    f"(+{100 * growth:.1f}% > {100 * tolerance:g}%)")
            (r.allowed if rule and growth <= rule.growth else r.failures).append(text)
    return missing


def to_json(results: List[CaseResult], triton_version: str) -> dict:
    drop = ("key", "failures", "allowed")
    return {"triton": triton_version, "cases": {r.key: {k: v for k, v in asdict(r).items() if k not in drop}
                                                for r in results}}


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
