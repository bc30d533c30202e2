"""Online expert skipping (the Mixture Compressor's dynamic pruning, `expert_skip_threshold`) on the reference tasks:
the share of decode-time expert calls skipped, against what it costs: exact-match accuracy on the generated tasks
and, on the text tasks, how much of the unskipped greedy continuation survives (tokens before the first change).

Every request runs through the real engine loop, all of a task's prompts batched together, with all experts
resident. Run it as `python -m premoe_service.bench.expert_skip --store var/reference-store`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from ..engine import EngineLoop, Request, SamplingParams
from ..evaluation.run import load_task_data
from ..pattern import Pattern
from ..runtime.build import load_model
from ..store import Store


def run_task(loop: EngineLoop, tokenizer: Any, prompts: list[list[int]], new_tokens: int, threshold: float):
    """Greedy continuations of `prompts` at `threshold`, and the expert calls skipped while decoding them."""
    params = SamplingParams(max_new_tokens=new_tokens, skip_below=threshold)
    pattern = Pattern.full(loop.patterned.spec)
    requests = [Request(list(p), pattern, params, tokenizer, stream=False) for p in prompts]
    for request in requests:
        loop.submit(request)
    loop.run_until_idle(timeout_s=600)
    return [r.generated for r in requests], sum(r.experts_skipped for r in requests)


def surviving(tokens: list[int], reference: list[int]) -> float:
    """Share of the reference continuation reproduced before the first differing token."""
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return same / max(1, len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("var/reference-store"))
    parser.add_argument("--data", type=Path, default=Path("reference/tasks"))
    parser.add_argument("--limit", type=int, default=40, help="eval items per task")
    parser.add_argument("--thresholds", default="0,0.1,0.2,0.3,0.4")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="text tasks: prompt cut from each text")
    parser.add_argument("--new-tokens", type=int, default=24, help="text tasks: tokens generated")
    parser.add_argument("--out", type=Path, default=Path("var/bench-expert-skip.json"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    store = Store(args.store)
    patterned, residency = load_model(store, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    loop = EngineLoop(patterned, residency, store, eos=set(), pad_id=tokenizer.pad_token_id or 0)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    names = sorted(p.parent.name for p in args.data.glob("*/eval.jsonl"))
    data = load_task_data(args.data, names, args.limit)
    calls_per_token = len(patterned.spec.moe_layers) * patterned.spec.top_k
    report: dict[str, Any] = {"thresholds": thresholds, "tasks": {}}
    print(f"{'task':<12} {'measure':<10} " + " ".join(f"{t:>12g}" for t in thresholds))
    try:
        for name in names:
            items = data[name].items
            if data[name].exact:
                prompts = [tokenizer(i.prompt)["input_ids"] for i in items]
                answers = [i.answer.strip() for i in items]
                new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2
            else:
                prompts = [tokenizer(i.text)["input_ids"][: args.prompt_tokens] for i in items]
                new = args.new_tokens
            rows: dict[str, list[float]] = {"quality": [], "skipped": []}
            baseline: list[list[int]] = []
            for threshold in thresholds:
                outputs, skipped = run_task(loop, tokenizer, prompts, new, threshold)
                baseline = baseline or outputs
                if data[name].exact:
                    texts = [str(tokenizer.decode(o, skip_special_tokens=True)).split("\n")[0].strip() for o in outputs]
                    quality = sum(t == a for t, a in zip(texts, answers, strict=True)) / len(items)
                else:
                    quality = statistics.fmean(surviving(o, b) for o, b in zip(outputs, baseline, strict=True))
                rows["quality"].append(quality)
                rows["skipped"].append(skipped / (len(prompts) * new * calls_per_token))
            measure = "accuracy" if data[name].exact else "surviving"
            report["tasks"][name] = {"measure": measure, **rows}
            print(f"{name:<12} {measure:<10} " + " ".join(f"{q:>12.3f}" for q in rows["quality"]))
            print(f"{'':<12} {'skipped':<10} " + " ".join(f"{s:>12.3f}" for s in rows["skipped"]))
    finally:
        loop.loader.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
