"""Profiling benchmark: a layer-streamed profile pass next to one plain transformers forward, in one run."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..profiler import collect_scores
from ..runtime.build import load_model
from ..store import Store, shard
from .common import bench_model


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main(
    hidden: int = 256, layers: int = 6, experts: int = 32, demos: int = 16, tokens: int = 128, rounds: int = 3
) -> dict:
    """Build a throwaway Qwen3-MoE store, then time both passes (interleaved, median) and compare memory."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(hidden, layers, experts)
        model.save_pretrained(Path(tmp) / "ckpt")
        shard(Path(tmp) / "ckpt", Path(tmp) / "store", progress=False)
        store = Store(Path(tmp) / "store")
        patterned, _ = load_model(store, device="cpu", capacity=0)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 512, (demos, tokens), generator=generator)
        mask = torch.ones_like(ids)

        def plain() -> None:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

        run_holder = {}

        def profile() -> None:
            run_holder["run"] = collect_scores(patterned, store, ids, mask, streamed=True)

        def experts_only() -> None:  # the same pass without the channel scores (`profiler.channels`)
            collect_scores(patterned, store, ids, mask, streamed=True, channels=False)

        plain()
        profile()
        experts_only()
        plain_t, profile_t, experts_t = [], [], []
        for _ in range(rounds):
            start = time.perf_counter()
            plain()
            plain_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            profile()
            profile_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            experts_only()
            experts_t.append(time.perf_counter() - start)
        run = run_holder["run"]
        full_bytes = _param_bytes(model)
        dense_bytes = _param_bytes(patterned.model)  # slots are empty after a streamed pass
        streamed_peak = dense_bytes + run.peak_slot_bytes
        result = {
            "tokens": demos * tokens,
            "plain_forward_s": statistics.median(plain_t),
            "profile_s": statistics.median(profile_t),
            "profile_without_channels_s": statistics.median(experts_t),
            "full_model_bytes": full_bytes,
            "profiling_peak_bytes": streamed_peak,
        }
    ratio = result["profile_s"] / result["plain_forward_s"]
    print(
        f"model: qwen3_moe, {layers} MoE layers x {experts} experts, hidden {hidden}; "
        f"demos: {demos} x {tokens} tokens; "
        f"median of {rounds} interleaved rounds"
    )
    print(f"{'pass':<44} {'seconds':>8} {'weights resident MiB':>21}")
    print(
        f"{'plain transformers forward (full model)':<44} {result['plain_forward_s']:>8.3f} {full_bytes / 2**20:>21.1f}"
    )
    print(
        f"{'premoe profile, layer-streamed, 4 criteria':<44} {result['profile_without_channels_s']:>8.3f} "
        f"{streamed_peak / 2**20:>21.1f}"
    )
    print(
        f"{'the same with channel scores (3 criteria)':<44} {result['profile_s']:>8.3f} {streamed_peak / 2**20:>21.1f}"
    )
    channels = (result["profile_s"] - result["profile_without_channels_s"]) / result["plain_forward_s"]
    print(f"time ratio profile/plain: {ratio:.2f} (target <= 1.5); memory ratio: {streamed_peak / full_bytes:.2f}")
    print(f"channel scores add {channels:.2f} of one plain forward")
    result["time_ratio"] = ratio
    result["channel_cost"] = channels
    return result
