"""Model assembly from a store: model skeleton on meta, dense part loaded, slots allocated for the budget."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import DataCorruption, FailedPrecondition
from ..families import adapter_for
from ..store.reader import Store
from .experts_forward import use_hit_experts
from .fused_norms import fuse_rms_norms
from .model import PatternedModel
from .residency import Budget, Residency


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`cuda` when available, else `cpu`, unless a device is given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    store: Store,
    budget: Budget | None = None,
    device: str | torch.device | None = None,
    wait_timeout_s: float = 30.0,
    *,
    capacity: int | None = None,
    dense: dict[str, torch.Tensor] | None = None,
) -> tuple[PatternedModel, Residency]:
    """Build the patterned model (and its residency) from a store with no expert loaded yet.

    Only the dense part and the slots for `budget` (default: every expert) occupy device memory; experts
    arrive when a lease loads a pattern. `capacity` sets slots per layer directly instead (0: no slots,
    for layer-streamed profiling). `dense` reuses already loaded dense tensors (shared, not copied).
    """
    device = resolve_device(device)
    manifest = store.manifest
    config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
    adapter = adapter_for(config)
    if adapter.name != manifest.family:
        raise FailedPrecondition(
            f"store manifest says {manifest.family!r} but its config is {adapter.name!r}", field="store"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=manifest.torch_dtype)
    spec = adapter.spec(config)
    if capacity is None:
        capacity = (budget or Budget(fraction=1.0)).slots_per_layer(spec, manifest.expert_nbytes)
    patterned = PatternedModel(model, capacity, device=device)

    if dense is None:
        dense = store.dense_state_dict(device)
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    slot_params = patterned.slot_param_names()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        slot_params.add("lm_head.weight")
    if unexpected or set(missing) - slot_params:
        raise DataCorruption(
            f"dense part does not fit the model: missing {sorted(set(missing) - slot_params)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}",
            field="dense",
        )
    materialise_buffers(model, device)
    _check_loaded(model)
    use_hit_experts(model)
    fuse_rms_norms(model)
    model.eval()
    return patterned, Residency(patterned, store, wait_timeout_s=wait_timeout_s)


def materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute buffers that are derived from the config (rotary frequencies) and were left on meta, on `device`.

    Modules without a config are left as they are (a model built only in part, as the router signal's, keeps
    the meta tensors of what it never runs)."""
    for name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        config = getattr(module, "config", None)
        if not meta or config is None:
            continue
        try:
            fresh = type(module)(config)
        except TypeError as exc:
            raise FailedPrecondition(
                f"cannot rebuild buffers {meta} of {name} ({type(module).__name__}) off the meta device",
                field=name,
            ) from exc
        for buffer_name in meta:
            module.register_buffer(
                buffer_name,
                getattr(fresh, buffer_name).to(device),
                persistent=buffer_name not in module._non_persistent_buffers_set,
            )
        for attr, value in vars(fresh).items():  # plain attributes computed with the buffers
            if not attr.startswith("_") and isinstance(value, (int, float)):
                setattr(module, attr, value)


def _check_loaded(model: nn.Module) -> None:
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise DataCorruption(f"tensors left without data after loading: {leftover[:5]}", field="dense")
