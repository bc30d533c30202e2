"""Per-precision error of each expert measured on a task's demos: how far its output moves when quantized.

For every MoE layer the demos' tokens routed to expert `e` by the full model are collected (`X_e`), and for
each precision `p` the error is `||E_p(X_e) - E(X_e)|| / ||E(X_e)||`, with `E_p` the expert computing with its
dequantized weights, through the runtime's own quantized slots. An expert no demo token reaches keeps its
relative weight error (measured when its copy was written).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..pattern import Pattern
from ..runtime.build import load_engine
from ..runtime.quantized import attach_precisions
from .demos import Demo
from .precision import PrecisionOption
from .run import tokenize_demos


@torch.no_grad()
def demo_errors(
    store, demos: Sequence[Demo], options: dict[str, PrecisionOption], max_length: int = 512
) -> dict[str, PrecisionOption]:
    """`options` with each quantized precision's error [L, E] measured on the demos (see the module doc)."""
    from transformers import AutoTokenizer

    quantized = [p for p, o in options.items() if o.error is not None]
    if not quantized:
        return dict(options)
    engine, _ = load_engine(store, device="cpu")
    spec = engine.spec
    attach_precisions(engine, store, dict.fromkeys(quantized, spec.num_experts))
    full = Pattern.full(spec)
    engine.apply(full, store)
    # Each quantized bank holds every expert, in expert order: load one pattern per precision.
    for precision in quantized:
        lowered = {layer: dict.fromkeys(range(spec.num_experts), precision) for layer in spec.moe_layers}
        engine.load(Pattern.build(spec, full.layers, lowered), store)
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for layer in spec.moe_layers:
        module = engine.experts_module(layer)

        def capture(_module, args, layer=layer) -> None:
            captured[layer] = (args[0].detach(), args[1].detach())  # hidden [T, H], slot ids [T, K]

        hooks.append(module.register_forward_pre_hook(capture))
    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    ids, mask, _ = tokenize_demos(tokenizer, demos, max_length)
    engine.activate(full)
    engine.model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    valid = mask.reshape(-1).bool()  # [T]: padded positions route too, but never count
    out = {}
    for precision, option in options.items():
        if option.error is None:
            out[precision] = option
            continue
        error = option.error.clone().double()
        for i, layer in enumerate(spec.moe_layers):
            hidden, slots = captured[layer]
            slots_of = engine.slots[layer].slot_of
            bank = engine.quantized.banks[layer][precision]  # type: ignore[union-attr]
            module = engine.experts_module(layer)
            for expert in range(spec.num_experts):
                rows = ((slots == slots_of[expert]).any(-1) & valid[: slots.shape[0]]).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                x, ones = hidden[rows], torch.ones((rows.numel(), 1), dtype=hidden.dtype)
                exact = module(x, torch.full_like(ones, slots_of[expert], dtype=torch.long), ones)
                slot = bank.offset + bank.slots.slot_of[expert]
                approx = module(x, torch.full_like(ones, slot, dtype=torch.long), ones)
                error[i, expert] = float((approx - exact).norm() / exact.norm().clamp_min(1e-30))
        out[precision] = PrecisionOption(precision, option.nbytes, error)
    return out
