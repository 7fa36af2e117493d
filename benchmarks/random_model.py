"""A model folder with random weights of a known shape, for speed runs without a download.

    python benchmarks/random_model.py OUT_DIR --shape llama-8b     # 8B Llama shape, bf16, ~16 GB
    python benchmarks/random_model.py OUT_DIR --shape llama-34b    # 34B (CodeLlama-34B's shape), ~68 GB
    python benchmarks/random_model.py OUT_DIR --shape qwen3-moe-16l   # Qwen3-30B-A3B's layers, 16 of 48, ~21 GB
    python benchmarks/random_model.py OUT_DIR --shape qwen3-next-16l  # a hybrid: Qwen3-Next's layers, 16 of 48
    python benchmarks/random_model.py OUT_DIR --shape mamba2-1.3b     # state-space layers only

The tokenizer is SmolLM2's (``smollm2-135m-instruct``, or a folder in ``--tokenizer``), so prompts
tokenize as real text; the vocabulary is the tokenizer's. Built on the GPU when there is one.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Mamba2Config, Qwen3MoeConfig, Qwen3NextConfig

from lgen.hf.models import resolve

SHAPES = {
    "llama-small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4),  # for CPU runs
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0),
    "llama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                      num_key_value_heads=8, rope_theta=1000000.0),  # CodeLlama-34B's shape: ~68 GB in bf16
    # Qwen3-30B-A3B's layer (128 experts, 8 a token, 3.3B of 30.5B parameters active), 16 of its 48
    # layers: a decode step costs a third of the whole model's, and the folder fits a 64 GB disk
    "qwen3-moe-16l": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1000000.0),
    # Qwen3-Next's layers (3 gated delta-net layers to 1 of attention, experts with a shared one), 16 of
    # its 48 and 64 of its 512 experts: a hybrid's decode step at a size one GPU holds
    "qwen3-next-16l": dict(hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
                           shared_expert_intermediate_size=512, num_hidden_layers=16, num_attention_heads=16,
                           num_key_value_heads=2, head_dim=256, num_experts=64, num_experts_per_tok=10,
                           linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                           linear_value_head_dim=128, linear_conv_kernel_dim=4, rope_theta=10000000.0),
    "qwen3-next-small": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                             shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                             linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                             linear_value_head_dim=64, linear_conv_kernel_dim=4),  # for CPU runs
    # Mamba2-1.3B's shape: state-space layers only
    "mamba2-1.3b": dict(hidden_size=2048, num_hidden_layers=48, state_size=128, num_heads=64, head_dim=64,
                        expand=2, n_groups=1, conv_kernel=4),
    "mamba2-small": dict(hidden_size=512, num_hidden_layers=8, state_size=64, num_heads=16, head_dim=64, expand=2,
                         n_groups=1, conv_kernel=4),  # for CPU runs
}
CONFIGS = {"qwen3-moe-16l": Qwen3MoeConfig, "qwen3-next-16l": Qwen3NextConfig, "qwen3-next-small": Qwen3NextConfig,
           "mamba2-1.3b": Mamba2Config, "mamba2-small": Mamba2Config}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--tokenizer", default="smollm2-135m-instruct")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve(args.tokenizer))
    config = CONFIGS.get(args.shape, LlamaConfig)(
        vocab_size=len(tok), max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[args.shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {args.out}")


if __name__ == "__main__":
    main()
