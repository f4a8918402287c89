"""Quantize a small Qwen3-MoE model (random weights, built from its config: nothing is downloaded)
and run it: every experts module becomes a w4a16.moe.W4A16Experts, the router stays in floating
point, and greedy generation is compared with the float model and with the model whose experts
hold the dequantized int4 weights (the same arithmetic, so the same tokens are expected).

    pip install -e ".[e2e]"                      # transformers
    python examples/moe_qwen3.py                 # CPU or GPU, a few seconds
    python examples/moe_qwen3.py --experts 64 --top-k 8 --layers 4 --hidden 512
"""
import argparse
import copy

import torch


def build(args, device):
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
                                      intermediate_size=2 * args.hidden, moe_intermediate_size=args.hidden // 2,
                                      num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                                      max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().to(device, torch.float16)


def generate(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    import w4a16
    from w4a16.moe import with_dequantized_experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args, device)
    quantized = copy.deepcopy(model)
    report = w4a16.quantize_model(quantized, group_size=64, progress=False)
    print(report)
    ref = with_dequantized_experts(model, quantized)
    w4a16.quantize_model(ref, group_size=64, progress=False, experts=False)
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1)).to(device)
    toks = {name: generate(m, prompt, args.steps)[0, 6:].tolist()
            for name, m in (("float", model), ("w4a16", quantized), ("dequantized experts", ref))}
    for name, t in toks.items():
        print(f"{name:>20}: {t}")
    same = toks["w4a16"] == toks["dequantized experts"]
    print(f"on {device} ({w4a16.describe_path(device)[0]}): w4a16 tokens "
          f"{'equal' if same else 'differ from'} the dequantized model's")
    return toks


if __name__ == "__main__":
    main()
