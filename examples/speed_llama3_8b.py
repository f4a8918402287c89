"""fp16 vs W4A16 on a Llama-3-8B-shaped model with random weights (needs a CUDA GPU).

Decode tokens/s at batch 1 and 16 (CUDA graphs over a static KV cache), prefill time for 2048
tokens and weight memory; the W4A16 model's logits are checked before anything is timed. The
quantized model runs q/k/v and gate/up as one fused W4A16 GEMM each (``--no-fuse`` to compare);
``--compile`` runs the decode step through torch.compile, ``--no-graph`` times it eagerly.

    pip install -e ".[e2e]"          # transformers is all this one needs beyond the package
    python examples/speed_llama3_8b.py --out speed-out            # 32 layers, about 3 minutes on an H100
    python examples/speed_llama3_8b.py --layers 4 --out speed-out # a quicker look
    python examples/speed_llama3_8b.py --compile --out speed-out  # the fused, compiled decode step
"""
from w4a16.e2e.speed import main

if __name__ == "__main__":
    main()
