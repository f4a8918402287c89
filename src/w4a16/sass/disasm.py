"""SASS of a compiled kernel, through the cuobjdump that Triton's NVIDIA backend ships.

An instruction is ``(address, opcode, text)``: the opcode with its modifiers (``HGMMA.64x8x16.F32``)
and without a predicate guard. Loops are found as backward branches.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

Instr = Tuple[int, str, str]

_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"^@!?U?P\w+\s+")
_BACK = re.compile(r"BRA\s+(?:`?\(?)0x([0-9a-f]+)")


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """cuobjdump's output (stdout and stderr) for ``cubin`` with ``flags``, e.g. "-sass"."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        r = subprocess.run([tool, *flags, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return r.stdout + r.stderr


def instructions(cubin: bytes) -> List[Instr]:
    """Every SASS instruction of the cubin, in address order."""
    out = []
    for ln in cuobjdump(cubin, "-sass").splitlines():
        m = _LINE.match(ln)
        if m and m.group(2):
            text = m.group(2)
            out.append((int(m.group(1), 16), _GUARD.sub("", text).split()[0], text))
    return out


def digest(ins: List[Instr]) -> str:
    """A fingerprint of the whole kernel's SASS, instruction for instruction, with the constant-bank
    offsets of kernel parameters masked (``c[0x0][0x...]``: they move when parameters do)."""
    import hashlib
    h = hashlib.sha1()
    for _, _, text in ins:
        h.update(re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][.]", text).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def registers(cubin: bytes) -> Optional[int]:
    """Registers per thread (cuobjdump's resource usage), None if it does not say."""
    m = re.search(r"REG:(\d+)", cuobjdump(cubin, "-res-usage"))
    return int(m.group(1)) if m else None


def spills(ins: List[Instr]) -> int:
    """Local-memory loads and stores (register spills or a stack array)."""
    return sum(1 for _, o, _ in ins if o.startswith(("LDL", "STL")))


def loops(ins: List[Instr]) -> List[Tuple[int, int, List[str]]]:
    """(first address, branch address, [opcodes in between]) of every backward branch."""
    out = []
    for a, _, t in ins:
        m = _BACK.search(t)
        if m and int(m.group(1), 16) < a:
            lo = int(m.group(1), 16)
            out.append((lo, a, [o for (b, o, _) in ins if lo <= b <= a]))
    return out


def hgmma_loop(ins: List[Instr]) -> List[str]:
    """The opcodes of the main loop: the backward branch spanning the most HGMMAs, the shortest such
    (the longest loop when none holds an HGMMA; [] when there is no loop)."""
    spans = [(sum(o.startswith("HGMMA") for o in body), -len(body), body) for _, _, body in loops(ins)]
    if not spans:
        return []
    if max(spans)[0]:
        return max(spans, key=lambda s: (s[0], s[1]))[2]
    return min(spans, key=lambda s: s[1])[2]


def wait_between_hgmma(body: List[str]) -> bool:
    """A wgmma wait between two HGMMAs with no dequant work in between (ptxas serialized them)."""
    hg = [i for i, o in enumerate(body) if o.startswith("HGMMA")]
    return any(any(o.startswith("WARPGROUP.DEPBAR") for o in body[i + 1:j]) and
               not any(o.startswith(("LDS", "LOP3", "HFMA2")) for o in body[i + 1:j])
               for i, j in zip(hg, hg[1:]))


@dataclass(frozen=True)
class LoopStats:
    """One main loop's numbers. ``uniform``: instructions of the uniform datapath (opcodes starting
    with U: scalar address and descriptor arithmetic, one per warp)."""
    instructions: int
    uniform: int
    hgmma: int
    weights_per_thread: int
    wait_between_hgmma: bool
    histogram: Dict[str, int]
    spills: int = 0              # local-memory loads and stores inside the loop (each iteration pays them)

    @property
    def per_weight(self) -> float:
        """SASS instructions per weight a thread dequantizes and multiplies in one iteration."""
        return self.instructions / self.weights_per_thread

    @property
    def vector_per_weight(self) -> float:
        """As ``per_weight``, without the uniform datapath's instructions."""
        return (self.instructions - self.uniform) / self.weights_per_thread


def loop_stats(body: List[str], weights_per_thread: int) -> LoopStats:
    hist = collections.Counter(body)
    return LoopStats(len(body), sum(v for k, v in hist.items() if k.startswith("U")),
                     sum(v for k, v in hist.items() if k.startswith("HGMMA")), weights_per_thread,
                     wait_between_hgmma(body), dict(hist.most_common()),
                     sum(v for k, v in hist.items() if k.startswith(("LDL", "STL"))))


_REG = re.compile(r"^R(\d+)$")
_NOT_DEST = ("ST", "LDGSTS", "RED", "BAR", "BRA", "EXIT", "HGMMA", "WARPGROUP", "DEPBAR", "SYNCS", "UTMA",
             "WARPSYNC", "NOP", "RET", "CALL", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "ARRIVES", "LDGDEPBAR")


def _written(opcode: str, text: str) -> List[int]:
    """The vector registers an instruction writes (its destination), [] for none or unknown."""
    if opcode.startswith(_NOT_DEST):
        return []
    operands = _GUARD.sub("", text).split(None, 1)
    if len(operands) < 2:
        return []
    m = _REG.match(operands[1].split(",")[0].strip())
    if not m:
        return []
    width = 4 if ".128" in opcode else 2 if (".64" in opcode or "WIDE" in opcode) else 1
    if opcode.startswith("LDSM"):
        width = int(opcode.rsplit(".", 1)[-1]) if opcode.rsplit(".", 1)[-1].isdigit() else 1
    return list(range(int(m.group(1)), int(m.group(1)) + width))


def _hgmma_a_registers(text: str) -> List[int]:
    """The A-operand registers of an HGMMA that reads A from registers (4: a 16-bit m64 x k16
    fragment), [] when A comes from shared memory (a descriptor)."""
    operands = [o.strip() for o in _GUARD.sub("", text).split(None, 1)[1].split(",")]
    m = _REG.match(operands[1]) if len(operands) > 1 else None
    return list(range(int(m.group(1)), int(m.group(1)) + 4)) if m else []


def register_operand_hazards(ins: List[Instr]) -> List[str]:
    """Writes to a register that an issued HGMMA reads as its A operand before a wgmma wait
    (``WARPGROUP.DEPBAR``) covers that HGMMA: the PTX ISA leaves such a write undefined (wgmma reads
    its register operands asynchronously), and a kernel that does it computes wrong results now
    and then. Each loop body is followed twice (an HGMMA issued at the end of one iteration and
    a write at the start of the next), the rest in address order. Returns one line per hazard:
    the HGMMA's address, the writing instruction's address and text."""
    found = []

    def walk(seq: List[Instr]) -> None:
        groups: List[Dict[int, int]] = []     # closed wgmma groups, oldest first: register -> HGMMA address
        current: Dict[int, int] = {}
        for a, op, text in seq:
            if op.startswith("WARPGROUP.DEPBAR"):
                m = re.search(r"gsb0,\s*0x([0-9a-f]+)", text)
                keep = int(m.group(1), 16) if m else 0
                groups = groups[len(groups) - keep:] if keep else []
                continue
            if op.startswith("HGMMA"):
                for r in _hgmma_a_registers(text):
                    current[r] = a
                if "gsb0" in text:
                    groups.append(current)
                    current = {}
                continue
            pending = dict(current)
            for g in groups:
                pending.update(g)
            for r in _written(op, text):
                if r in pending:
                    line = f"HGMMA at {pending[r]:#x} reads R{r}, written at {a:#x} before its wait: {text}"
                    if line not in found:
                        found.append(line)

    walk(ins)
    for lo, hi, _ in loops(ins):
        body = [i for i in ins if lo <= i[0] <= hi]
        walk(body + body)
    return found
