"""Tiny random configs of every supported family, for tests, demos and benchmarks (built with `from_config`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .adapters import adapter_for

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 3,
        "head_dim": 8,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "num_hidden_layers": 4,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "mixtral": {
        "model_type": "mixtral",
        "num_hidden_layers": 2,
        "intermediate_size": 16,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "olmoe": {
        "model_type": "olmoe",
        "num_hidden_layers": 2,
        "intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
    },
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.5,
        **_MLA,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        **_MLA,
    },
    "gpt_oss": {
        "model_type": "gpt_oss",
        "num_hidden_layers": 2,
        "head_dim": 8,
        "intermediate_size": 16,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}
# DeepSeek-V2 with group-limited greedy routing: 4 groups of 2 experts, 2 groups per token.
TINY_CONFIGS["deepseek_v2_grouped"] = {
    **TINY_CONFIGS["deepseek_v2"],
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 1.0,
}


def tiny_config(name: str, **overrides: Any) -> Any:
    """The transformers config of a tiny model of family variant `name` (a key of `TINY_CONFIGS`)."""
    fields = {**_COMMON, **TINY_CONFIGS[name], **overrides}
    return AutoConfig.for_model(**fields)


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """A seeded tiny model whose routers make decisive choices (no near-ties between experts)."""
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # transformers initialises routers near zero; spread them so routing is far from ties.
        for layer in adapter.spec(config).moe_layers:
            router = adapter.router(model, layer)
            weight = router.get_parameter("weight")
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
            for name_ in ("bias", "e_score_correction_bias"):
                extra = getattr(router, name_, None)
                if isinstance(extra, torch.Tensor):
                    extra.copy_(torch.randn(extra.shape, generator=generator) * 0.1)
            experts = adapter.experts(model, layer)
            for param in experts.parameters(recurse=False):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def tiny_tokenizer() -> Any:
    """A character-level tokenizer whose ids fit the tiny models' 128-token vocabulary (printable ASCII)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2, UNK: 3}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    vocab["\n"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)


def save_tiny_checkpoint(path: str | Any, name: str, seed: int = 0) -> Any:
    """Write a tiny model of `name` with the character tokenizer to `path` (a transformers checkpoint)."""
    model = tiny_model(name, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model
