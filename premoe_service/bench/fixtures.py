"""What the benchmarks set up: a random MoE model big enough to time (the Redis server: premoe_service.loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bench_model_dir(out: Path, hidden: int, experts: int, layers: int) -> Path:
    """A Qwen3-MoE checkpoint with experts big enough for throughput figures (random weights)."""
    bench_model(hidden, layers, experts).save_pretrained(out)
    return out


def bench_model(hidden: int, layers: int, experts: int, vocab: int = 512) -> Any:
    """A random Qwen3-MoE whose experts are `hidden` x `hidden` SwiGLU blocks (top-2, normalised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()
