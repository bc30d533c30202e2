"""Retention of each text task's served pattern with every expert at a lower precision (what demotion serves under
pressure, docs/tasks.md), against the same pattern at full precision: perplexity ratio over the first eval items.

    python -m scripts.demoted_retention STORE [--data reference/tasks] [--items 40] [--slots 8] [--precision int8]

`--slots`: the full-precision slots per layer of the server whose plans are measured (its budget times the expert
count: 8 at budget 0.5 on the reference model); patterns are chosen as the server chooses them, from each profile's
stored selection, at most that many experts a layer. The store must hold the precision's copy.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from premoe_service.evaluation.run import load_eval_items
from premoe_service.pattern import Pattern
from premoe_service.profiler import Profile, Selection
from premoe_service.profiler.selection import select
from premoe_service.runtime.build import load_model
from premoe_service.runtime.quantized import attach_precisions
from premoe_service.store import Store

TEXT_TASKS = ("c", "prose", "python", "shell")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--profiles", type=Path, default=Path("profiles"))
    parser.add_argument("--data", type=Path, default=Path("reference/tasks"))
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--precision", default="int8")
    args = parser.parse_args()

    store = Store(args.store)
    patterned, _ = load_model(store, device="cpu")
    spec = patterned.spec
    attach_precisions(patterned, store, {args.precision: spec.num_experts})
    tokenizer = AutoTokenizer.from_pretrained(args.store, local_files_only=True)
    for task in TEXT_TASKS:
        profile = Profile.load(args.profiles / f"{task}.safetensors")
        selection = Selection.from_json(profile.selection)
        scores = profile.score(selection.criterion)
        pattern = select(scores, spec, selection, store.manifest.expert_nbytes, max_per_layer=args.slots)
        lowered_at = {layer: dict.fromkeys(pattern.kept(layer), args.precision) for layer in pattern.layers}
        lowered = Pattern.build(spec, pattern.layers, lowered_at)
        items = load_eval_items(args.data / task / "eval.jsonl", args.items)
        nll = {}
        for name, served in (("full", pattern), (args.precision, lowered)):
            patterned.apply(served, store)
            total, count = 0.0, 0
            with torch.no_grad():
                for item in items:
                    ids = torch.tensor([tokenizer(item.text)["input_ids"][:256]])
                    logits = patterned.model(ids).logits
                    total += torch.nn.functional.cross_entropy(
                        logits[0, :-1].double(), ids[0, 1:], reduction="sum"
                    ).item()
                    count += ids.shape[1] - 1
            nll[name] = total / count
        print(
            f"{task}: {pattern.size} experts; perplexity full {math.exp(nll['full']):.4f}, {args.precision} "
            f"{math.exp(nll[args.precision]):.4f}; retention {math.exp(nll['full'] - nll[args.precision]):.4f}"
        )


if __name__ == "__main__":
    main()
