"""Tiny random models of every causal-LM type the installed transformers registers, for the
architecture matrix (``test_architectures.py``, ``test_gpu_architectures.py``) and
``benchmarks/architectures.py``.

A type's default config is shrunk by the names of its fields (2 layers, width 64, 4 heads, a
vocabulary of 128, a sliding window or chunk of 8, 4 experts, ...); per-layer lists keep one
layer of each kind, so a hybrid keeps its mix. A few types need a field or two more to be built
at all (:data:`FIXES`); :data:`VARIANTS` adds configurations a type's default does not show
(ALiBi, shared key/value layers). Weights are random, drawn at the largest of a few scales at
which the model's output depends on its context (at transformers' default scale many tiny
models only echo their last token, and would agree with any engine).
"""

from __future__ import annotations

import re
from typing import Any

import torch

VOCAB = 128
WINDOW = 8  # sliding windows and attention chunks: shorter than the longer prompts
SCALES = (0.3, 0.1, 0.02)  # initializer ranges tried, largest first
MAX_PARAMETERS = 6_000_000

# (field name pattern, value): an int field whose name matches is set to the value when larger;
# None: a token id, kept inside the vocabulary
RULES: list[tuple[str, int | None]] = [
    (r"num_hidden_layers|n_layers?|num_layers|decoder_layers|encoder_layers|num_decoder_layers", 2),
    (r"hidden_size|d_model|n_embd|embed_dim|dim|model_dim|hidden_dim|emb_size", 64),
    (r"intermediate_size|ffn_dim|d_ff|n_inner|decoder_ffn_dim|encoder_ffn_dim|ffn_hidden_size|mlp_dim"
     r"|moe_intermediate_size|shared_expert_intermediate_size|expert_intermediate_size|dim_ff|dim_feedforward"
     r"|.*intermediate_size", 96),
    (r"num_attention_heads|n_head|n_heads|num_heads|decoder_attention_heads|encoder_attention_heads", 4),
    (r"num_key_value_heads|n_kv_heads|num_kv_heads|multi_query_group_num", 2),
    (r"head_dim|kv_channels|attention_head_dim|attention_head_size|v_head_dim", 16),
    (r"vocab_size", VOCAB), (r"(shape|pronunciation)_vocab_size", 64),
    (r"max_position_embeddings|n_positions|n_ctx|max_seq_len|max_sequence_length", 256),
    (r"sliding_window|attention_window|window_size|attention_chunk_size|local_window_size", WINDOW),
    (r"num_experts|n_routed_experts|num_local_experts|moe_num_experts|n_experts", 4),
    (r"num_experts_per_tok|moe_topk|n_activated_experts|num_selected_experts|moe_k", 2),
    (r"q_lora_rank", 32), (r"kv_lora_rank", 16), (r"qk_rope_head_dim|qk_nope_head_dim", 16), (r"rotary_dim", 8),
    (r"index_head_dim", 16), (r"index_n_heads", 2), (r"index_topk", 8), (r"n_group|topk_group", 1),
    (r"pad_token_id|bos_token_id|eos_token_id|decoder_start_token_id|sep_token_id|cls_token_id|mask_token_id"
     r"|unk_token_id", None),
]

_MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16}
_GEMMA4 = {"layer_types": ["sliding_attention", "full_attention"], "num_hidden_layers": 2,
           "per_layer_config": {"01": {"head_dim": 32}}, "hidden_size_per_layer_input": 16,
           "vocab_size_per_layer_input": VOCAB}
_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}
_LLAMA4 = {"floor_scale": 4, "attn_scale": 0.5, "attn_temperature_tuning": True}  # the temperature acts early

# fields a type needs beyond the rules to be built (transformers' default config is broken, or
# its fields must agree with each other)
FIXES: dict[str, dict[str, Any]] = {
    "gemma4_text": _GEMMA4, "gemma4": {"text_config": _GEMMA4}, "gemma4_unified_text": _GEMMA4,
    "gemma4_unified": {"text_config": _GEMMA4},
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                     "layer_types": ["sliding_attention", "full_attention"] * 2, "intermediate_size": [96] * 4,
                     "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB,
                     "activation_sparsity_pattern": [0.0] * 4, "laurel_rank": 8},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1, "time_step_rank": 8, "state_size": 16, "chunk_size": 16},
    "bamba": {**_MAMBA, "attn_layer_indices": [1]},
    "granitemoehybrid": {**_MAMBA, "layer_types": ["mamba", "attention"]},
    "xlm": {"emb_dim": 64, "is_encoder": False, "causal": True},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "lsh"], "axial_pos_shape": [16, 16],
                 "axial_pos_embds_dim": [32, 32], "hidden_size": 64, "feed_forward_size": 96,
                 "attention_head_size": 16, "local_attn_chunk_length": WINDOW, "lsh_attn_chunk_length": WINDOW},
    "zamba": {"attention_hidden_size": 128, "attention_head_dim": 32, "mamba_dt_rank": 8, "attn_layer_period": 2,
              "attn_layer_offset": 1, "num_hidden_layers": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},
    "xlnet": {"d_head": 16},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": _ROPE, "sliding_attention": _ROPE}},
    "xmod": {"default_language": "en_XX"},
    "longcat_flash": {"qk_head_dim": 32, "v_head_dim": 16, "expert_ffn_hidden_size": 96, "zero_expert_num": 2,
                      "moe_topk": 2, "n_routed_experts": 4},
    "hrm_text": {"num_hidden_layers": 4, "num_layers_per_stack": 2, "H_cycles": 1, "L_cycles": 1},
    "dory": {"num_hidden_layers": 8, "n_input_layers": 2, "n_recurrent_layers": 4, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"] * 2},
    "llama4_text": _LLAMA4, "llama4": {"text_config": _LLAMA4},
    # state layers beside attention, each kind kept in two layers
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "mamba_dt_rank": 8},
    "kimi_linear": {"linear_head_dim": 16, "linear_num_heads": 4, "qk_head_dim": 32, "num_experts_per_token": 2},
    "zamba2": {"attention_hidden_size": 128, "mamba_headdim": 16, "adapter_rank": 8, "chunk_size": 16,
               "hybrid_layer_ids": [1]},
    "recurrent_gemma": {"lru_width": 64, "attention_window_size": WINDOW, "num_key_value_heads": 1,
                        "block_types": ["recurrent", "attention"]},
    "rwkv": {"attention_hidden_size": 64},
    "xlstm": {"embedding_dim": 64, "num_blocks": 2, "chunk_size": 16},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
}

# name -> (model type, fields): configurations beyond a type's default
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "falcon+alibi": ("falcon", {"alibi": True}),
    "gemma4_text+kv_sharing": ("gemma4_text", {**_GEMMA4, "num_hidden_layers": 4, "num_kv_shared_layers": 2,
                                                "layer_types": ["sliding_attention", "full_attention"] * 2,
                                                "per_layer_config": {"01": {"head_dim": 32}, "03": {"head_dim": 32}}}),
}


def names() -> list[str]:
    """Every causal-LM type of the installed transformers, and the variants."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + sorted(VARIANTS)


def _is_indices(value: list) -> bool:
    """A list of layer indices (``[0, 1, 2, ...]``, increasing), not one value per layer."""
    return (len(value) > 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            and value == sorted(set(value)))


def _shrink(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with :data:`RULES` applied, sub-configs too; per-layer lists keep a layer of each kind."""
    out = dict(fields)
    layers = next((fields[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(fields.get(k), int)), None)
    for key, value in fields.items():
        if isinstance(value, dict):
            out[key] = _shrink(value)
            continue
        if isinstance(value, bool) or not isinstance(key, str):
            continue
        for pattern, small in RULES:
            if not re.fullmatch(pattern, key):
                continue
            if small is None:  # a token id
                if isinstance(value, int) and value >= VOCAB:
                    out[key] = 2 if "eos" in key else 1 if "bos" in key else 0
                elif isinstance(value, list):
                    out[key] = [x if isinstance(x, int) and x < VOCAB else 2 for x in value]
            elif (isinstance(value, int) and (value > small or "window" in pattern or "vocab" in pattern)) or (
                    value is None and re.search("head|expert", pattern)):
                out[key] = small
            break
    heads = next((fields[k] for k in ("num_attention_heads", "n_head", "n_heads", "num_heads")
                  if isinstance(fields.get(k), int)), None)
    for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):  # no grouping stays no grouping
        if isinstance(fields.get(key), int) and heads and fields[key] == heads:
            out[key] = next(out[k] for k in ("num_attention_heads", "n_head", "n_heads", "num_heads") if k in out)
    if layers:
        per_layer = [k for k, v in fields.items() if isinstance(v, list) and len(v) == layers and not _is_indices(v)]
        for key in per_layer:
            kinds = list(dict.fromkeys(map(str, fields[key])))
            out[key] = ([next(x for x in fields[key] if str(x) == kind) for kind in kinds] if len(kinds) > 1
                        else fields[key][:2])
        count = max([2, *(len(out[k]) for k in per_layer)])
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(fields.get(key), int):
                out[key] = count
        for key, value in fields.items():
            if isinstance(value, list) and value and _is_indices(value):
                out[key] = [i for i in value if i < count]
    return out


def _merge(fields: dict[str, Any], fix: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for key, value in fix.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and key != "per_layer_config"
        out[key] = _merge(out[key], value) if nested else value
    return out


def tiny_config(name: str, *, scale: float = 0.02) -> Any:
    """The tiny config of a type (or variant), its weights to be drawn at ``scale``."""
    from transformers import CONFIG_MAPPING

    model_type, fix = VARIANTS.get(name, (name, FIXES.get(name, {})))
    cls = CONFIG_MAPPING[model_type]
    fields = _merge(_shrink(cls().to_dict()), fix)
    for key in ("initializer_range", "init_std"):
        if isinstance(fields.get(key), float):
            fields[key] = scale
    if isinstance(fields.get("initializer_factor"), float):
        fields["initializer_factor"] *= scale / 0.02
    return cls.from_dict(fields)


def tiny_model(name: str, *, scale: float = 0.02) -> torch.nn.Module:
    """A random model of the tiny config, in float32, in eval mode, generating no EOS of its own.
    Raises ``ValueError`` when it would be larger than :data:`MAX_PARAMETERS`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(name, scale=scale)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size:,} parameters at the smallest width the rules give")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return model
