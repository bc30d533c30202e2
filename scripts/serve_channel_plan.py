"""Serve one channel plan through residency and channel slots, and compare it with `premoe eval`'s computation of
the same plan (docs/atomic-experts.md, section 5, "On the reference model").

    python scripts/serve_channel_plan.py STORE PLAN.json EVAL.jsonl [--items 20] [--redis-url URL] [--loads 1]

Banks are sized from the plan (one per precision and channel count it uses, as many slots as its fullest layer
needs); whole lowered experts get quantized slots. Prints the plan's counted bytes and the resident bytes of its
experts, the bytes read to load it by tier (from channel-major copies when the store has them; through Redis with
`--redis-url`, else the in-process cache; `--loads N` loads it N times, releasing the slots in between, so the
later loads show what the cache tier serves), and over the first eval items the largest logit difference and the
mean NLL of both computations.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

from premoe_service.evaluation.channel_eval import PlanWeights, install_plan
from premoe_service.pattern import FULL, Pattern
from premoe_service.profiler.channel_plan import ChannelPlan, ExpertShape, channel_nbytes
from premoe_service.profiler.precision_plan import store_options
from premoe_service.runtime.build import load_model
from premoe_service.runtime.channel_slots import attach_channels
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import Store, open_cache
from premoe_service.store.channel_major import channel_group_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--redis-url", default=None, help="the cache tier (default: the in-process cache)")
    parser.add_argument("--loads", type=int, default=1, help="load the plan this many times (slots released between)")
    args = parser.parse_args()

    store = Store(args.store, cache=open_cache(args.redis_url))
    patterned, residency = load_model(store, device="cpu")
    spec = patterned.spec
    pattern = Pattern.load(spec, args.plan)
    banks: Counter[str] = Counter()
    whole: Counter[str] = Counter()
    for layer in spec.moe_layers:
        per_bank: Counter[str] = Counter()
        per_precision: Counter[str] = Counter()
        for e in pattern.kept(layer):
            ids, precision = pattern.channel_ids(layer, e), pattern.precision(layer, e)
            if ids is not None:
                per_bank[f"{precision}@{len(ids)}"] += 1
            elif precision != FULL:
                per_precision[precision] += 1
        banks |= per_bank  # the most any layer needs
        whole |= per_precision
    if whole:
        attach_precisions(patterned, store, dict(whole))
    attach_channels(patterned, store, dict(banks))
    assert patterned.channels is not None
    print(
        f"banks {dict(banks)}; whole lowered slots {dict(whole)}; "
        f"channel-major {sorted(patterned.channels.channel_major)}"
    )

    shape, group = ExpertShape.of(store.manifest), channel_group_size(store)
    precisions = {pattern.precision(layer, e) for layer in spec.moe_layers for e in pattern.kept(layer)}
    options = store_options(store, precisions=(FULL, *sorted(precisions - {FULL})))
    counted = 0
    for layer in spec.moe_layers:
        for e in pattern.kept(layer):
            ids, precision = pattern.channel_ids(layer, e), pattern.precision(layer, e)
            counted += (
                options[precision].nbytes
                if ids is None
                else channel_nbytes(shape, precision, len(ids), group, options[FULL].nbytes)
            )
    for _ in range(args.loads - 1):  # earlier loads: each fills the slots from the tiers, then frees them
        before = dict(store.stats.bytes)
        with residency.lease(pattern):
            read_by = {t: store.stats.bytes[t] - before.get(t, 0) for t in store.stats.bytes}
        residency.release([pattern], [], store.manifest.expert_nbytes)
        print(f"earlier load: bytes read by tier {read_by}")
    before = dict(store.stats.bytes)
    start = time.perf_counter()
    with residency.lease(pattern):
        seconds = time.perf_counter() - start
        read_by = {t: store.stats.bytes[t] - before.get(t, 0) for t in store.stats.bytes}
        read = sum(read_by.values())
        held = residency.describe(pattern, store.manifest.expert_nbytes)
        cut = sum(len(by) for by in pattern.channels.values())
        print(
            f"plan: {pattern.size} experts, {cut} held in part; counted bytes {counted}; resident bytes of its "
            f"experts {held.nbytes}; by bank {held.precisions}"
        )
        print(f"load: {seconds:.2f} s, {read} bytes read ({read / held.nbytes:.2f}x the bytes kept), by tier {read_by}")

        tokenizer = AutoTokenizer.from_pretrained(store.dir)
        texts = [json.loads(line)["text"] for line in args.data.read_text().splitlines()[: args.items]]
        other, _ = load_model(store, device="cpu")
        other.apply(Pattern.full(spec), store)
        other.activate(install_plan(other, PlanWeights(store), ChannelPlan.load(spec, shape.intermediate, args.plan)))
        worst, nll, tokens = 0.0, [0.0, 0.0], 0
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([tokenizer(text)["input_ids"][:256]])
                residency.activate(pattern)
                served = patterned.model(ids).logits
                evaluated = other.model(ids).logits
                worst = max(worst, (served - evaluated).abs().max().item())
                for i, logits in enumerate((served, evaluated)):
                    nll[i] += torch.nn.functional.cross_entropy(
                        logits[0, :-1].double(), ids[0, 1:], reduction="sum"
                    ).item()
                tokens += ids.shape[1] - 1
    print(
        f"{len(texts)} items ({tokens} tokens): max |logit diff| served vs premoe eval's computation {worst:.2e}; "
        f"mean NLL served {nll[0] / tokens:.6f}, eval's {nll[1] / tokens:.6f}"
    )


if __name__ == "__main__":
    main()
