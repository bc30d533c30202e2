"""What differs between the transformers releases the package admits (`transformers>=5.20,<6`).

A causal LM's forward took its KV cache as `past_key_values` and returned it under that name; newer releases take
and return `cache` (5.24 warns that `past_key_values` goes in 5.40). Code that drives a model's forward step by
step (the evaluation's greedy completions, the route-quality scorer, the benchmarks' transformers baseline) asks
here which name the loaded model takes.
"""

from __future__ import annotations

import inspect
from typing import Any


def cache_keyword(model: Any) -> str:
    """The keyword `model`'s forward takes its KV cache by: "cache" where it has that parameter, else
    "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either name (None when it returned none)."""
    if "cache" in output:
        return output["cache"]
    return output.get("past_key_values")
