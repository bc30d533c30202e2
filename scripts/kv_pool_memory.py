"""How much memory the engine's KV pool holds after one long request beside three short ones (docs/serving.md,
"Where it stands", small hours of 2026-12-07). Runs the compiled engine of `premoe bench step` on the reference
store; prints the pool's bytes and the time to finish. Works on checkouts before the pool was paged too.

    python scripts/kv_pool_memory.py 600 1800     # new tokens of the long request, one run each
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from premoe_service.bench.step import EngineSteps, _step_until
from premoe_service.engine import Request, SamplingParams, Status


def main(lengths: list[int]) -> None:
    torch.set_num_threads(1)
    engine = EngineSteps(Path("var/reference-store"), "cpu", 32, compiled=True)
    loop, prompts = engine.loop, engine.ids(4, 24)
    for new in lengths:
        long = Request(prompts[0], engine.pattern, SamplingParams(max_new_tokens=new), engine.tokenizer)
        short = [Request(p, engine.pattern, SamplingParams(max_new_tokens=8), engine.tokenizer) for p in prompts[1:]]
        requests = [loop.submit(r) for r in (long, *short)]
        start = time.perf_counter()
        _step_until(loop, requests, Status.FINISHED, "the requests did not finish")
        pool = loop.kv
        held = sum(t.nbytes for store in (pool.keys, pool.values) for t in store.values())
        print(f"a request of {24 + new} tokens: KV pool {held / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s")
    engine.close()


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]] or [600, 1800])
