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
from ..runtime.build import load_model
from ..runtime.quantized import attach_precisions
from .demos import Demo
from .precision_plan import PrecisionOption
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
    patterned, _ = load_model(store, device="cpu")
    spec = patterned.spec
    attach_precisions(patterned, store, dict.fromkeys(quantized, spec.num_experts))
    full = Pattern.full(spec)
    patterned.apply(full, store)
    # Each quantized bank holds every expert, in expert order: load one pattern per precision.
    for precision in quantized:
        lowered = {layer: dict.fromkeys(range(spec.num_experts), precision) for layer in spec.moe_layers}
        patterned.load(Pattern.build(spec, full.layers, lowered), store)
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for layer in spec.moe_layers:
        module = patterned.experts_module(layer)

        def capture(_module, args, layer=layer) -> None:
            captured[layer] = (args[0].detach(), args[1].detach())  # hidden [T, H], slot ids [T, K]

        hooks.append(module.register_forward_pre_hook(capture))
    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    ids, mask, _ = tokenize_demos(tokenizer, demos, max_length)
    patterned.activate(full)
    patterned.model(input_ids=ids, attention_mask=mask)
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
            slots_of = patterned.slots[layer].slot_of
            bank = patterned.quantized.banks[layer][precision]  # type: ignore[union-attr]
            module = patterned.experts_module(layer)
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


@torch.no_grad()
def channel_kept(
    store, demos: Sequence[Demo], channel_scores: dict[str, Tensor], counts: Sequence[int], max_length: int = 512
) -> dict[str, Tensor]:
    """Per channel criterion, the share of each expert's output energy its best `k` channels keep on the demos,
    for each `k` in `counts`: `1 - err**2` with `err = ||E_k(X_e) - E(X_e)|| / ||E(X_e)||` over the demo tokens
    the full model routes to the expert (`E_k`: the expert with only its k best channels by the criterion's
    scores `[L, E, I]`). `[L, E, len(counts)]`; an expert no demo token reaches keeps its share of channel
    score mass (`channels.kept_share`). The channel counterpart of `demo_errors`: measured, so cross-channel
    terms and how the scores rank count, where the score mass only estimates them."""
    from transformers import AutoTokenizer

    from .channels import kept_share
    from .routing_stats import ChannelBatch, expert_outputs

    patterned, _ = load_model(store, device="cpu")
    spec = patterned.spec
    patterned.apply(Pattern.full(spec), store)
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for layer in spec.moe_layers:

        def capture(_module, args, layer=layer) -> None:
            captured[layer] = (args[0].detach(), args[1].detach())  # hidden [T, H], slot ids [T, K]

        hooks.append(patterned.experts_module(layer).register_forward_pre_hook(capture))
    tokenizer = AutoTokenizer.from_pretrained(store.dir, local_files_only=True)
    ids, mask, _ = tokenize_demos(tokenizer, demos, max_length)
    patterned.activate(Pattern.full(spec))
    patterned.model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    valid = mask.reshape(-1).bool()
    out = {name: kept_share(scores, counts) for name, scores in channel_scores.items()}
    for i, layer in enumerate(spec.moe_layers):
        hidden, slots = captured[layer]
        module = patterned.experts_module(layer)
        slot_of = patterned.slots[layer].slot_of
        for expert in range(spec.num_experts):
            rows = ((slots == slot_of[expert]).any(-1) & valid[: slots.shape[0]]).nonzero().flatten()
            if rows.numel() == 0:
                continue
            batches: list[ChannelBatch] = []
            whole = expert_outputs(
                module, hidden[rows], torch.full((rows.numel(), 1), slot_of[expert], dtype=torch.long), batches
            )  # [n, 1, H]
            energy = float((whole.double() ** 2).sum())
            if energy <= 0:
                continue
            h, down = batches[0].hidden.double(), batches[0].down.double()  # [n, I], [H, I]
            for name, scores in channel_scores.items():
                order = scores[i, expert].argsort(descending=True, stable=True)
                dropped_energy = []
                for k in counts:
                    rest = order[k:]
                    lost = h[:, rest] @ down[:, rest].t()  # [n, H] what the dropped channels added
                    dropped_energy.append(float((lost**2).sum()) / energy)
                out[name][i, expert] = (1 - torch.tensor(dropped_energy, dtype=torch.float64)).clamp_min(0)
    return out
