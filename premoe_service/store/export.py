"""`premoe export`: a standard transformers checkpoint of the model pruned to one pattern."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig

from ..errors import AlreadyExists, PatternError
from ..families import RoutingSpec, adapter_for
from ..families.channels import checkpoint_width, intermediate_field, pad_channels, slice_channels
from ..pattern import FULL, Pattern
from .channels import ChannelReader
from .checkpoint_io import write_safetensors_streaming
from .manifest import DENSE, MANIFEST
from .quantized_copies import PrecisionReader
from .reader import Store

_ROUTER_ROWS = ("weight", "bias", "e_score_correction_bias")  # per-expert rows of a router


def export_pruned(
    store: Store,
    pattern: Pattern,
    out: str | Path,
    *,
    progress: bool = True,
    channels: Mapping[int, Mapping[int, torch.Tensor]] | None = None,
) -> Path:
    """Write `out/model.safetensors` and `out/config.json` (plus tokenizer files) for the pruned model.

    Expert tensors and router rows (weights, router bias, score-correction bias) are sliced to the kept
    experts and the config's expert count is set, so `AutoModelForCausalLM.from_pretrained(out)` loads it
    and vLLM or SGLang can serve it. Every layer must keep the same number of experts (a config has one
    expert count), and with group-limited routing the same number in every group.

    With `channels` (a channel plan's: layer -> expert -> kept channel ids), experts are also cut to their kept
    channels (a quantized slice as the plan computes it, `store.channels`) and the config's intermediate size
    becomes the widest kept expert's; narrower experts get zero channels up to it, which add nothing.
    """
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise AlreadyExists(f"{out} already holds a checkpoint; choose another --out", field="out")
    config = AutoConfig.from_pretrained(store.dir, local_files_only=True)
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    pattern.validate(spec)
    kept_count = _uniform_count(pattern, spec.routing)

    width, family = 0, store.manifest.family
    extra_fields: dict[str, int] = {}
    if channels:
        intermediate = int(getattr(config, intermediate_field(family)))
        widths = [
            int(channels.get(layer, {}).get(e, torch.empty(intermediate)).numel())
            for layer in spec.moe_layers
            for e in pattern.kept(layer)
        ]
        width, extra_fields = checkpoint_width(family, config, max(widths))
    dense = store.dense_state_dict("cpu")
    kept_index = {layer: torch.tensor(pattern.kept(layer)) for layer in spec.moe_layers}
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    sources: list[str | tuple[int, str]] = []  # a dense key, or (layer, expert parameter)
    for key, tensor in dense.items():
        layer = _router_layer(adapter.runtime_prefix, adapter.router_attr, spec.moe_layers, key)
        if layer is not None:
            tensor = tensor.index_select(0, kept_index[layer])
            dense[key] = tensor
        specs.append((key, tensor.dtype, tuple(tensor.shape)))
        sources.append(key)
    shapes = {part.name: tuple(part.shape) for part in store.manifest.parts}
    if width:
        meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        cut = pad_channels(family, slice_channels(family, meta, torch.arange(width)), width)
        shapes = {name: tuple(t.shape) for name, t in cut.items()}
    for layer in spec.moe_layers:
        for part in store.manifest.parts:
            key = f"{adapter.runtime_prefix(layer)}{adapter.experts_attr}.{part.name}"
            specs.append((key, store.manifest.torch_dtype, (kept_count, *shapes[part.name])))
            sources.append((layer, part.name))

    bar = tqdm(total=len(specs), desc="export", unit="tensor", disable=not progress)
    readers: dict[str, PrecisionReader] = {}
    cutter = ChannelReader(store) if width else None

    def expert(layer: int, e: int) -> dict[str, torch.Tensor]:
        if cutter is None:
            return _expert(store, pattern, readers, layer, e)
        kept = (channels or {}).get(layer, {}).get(e)
        return pad_channels(family, cutter.channels(layer, e, pattern.precision(layer, e), kept), width)

    def tensors() -> Iterator[torch.Tensor]:
        for source in sources:
            bar.update()
            if isinstance(source, str):
                yield dense[source]
            else:
                layer, name = source
                yield torch.stack([expert(layer, e)[name] for e in pattern.kept(layer)])

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(out / "model.safetensors", specs, tensors(), metadata={"format": "pt"})
    bar.close()
    for path in store.dir.iterdir():
        if path.is_file() and path.name not in (MANIFEST, DENSE, "config.json"):
            shutil.copy2(path, out / path.name)
    # Through the config object, so attribute maps (num_experts <-> num_local_experts) stay consistent.
    setattr(config, adapter.expert_count_field, kept_count)
    if width:
        setattr(config, intermediate_field(family), width)
        for name, value in extra_fields.items():
            setattr(config, name, value)
    config.save_pretrained(out)
    return out


def _expert(store: Store, pattern: Pattern, readers: dict[str, PrecisionReader], layer: int, expert: int):
    """An expert's tensors as the pattern holds it: full, or dequantized from its precision's copy (a checkpoint
    holds each layer's experts as one fused tensor under one scheme, so a mixed layer is written dequantized)."""
    precision = pattern.precision(layer, expert)
    if precision == FULL:
        return store.read(layer, expert)
    if precision not in readers:
        readers[precision] = PrecisionReader(store, precision)
    return readers[precision].read_dequantized(layer, expert)


def _uniform_count(pattern: Pattern, routing: RoutingSpec) -> int:
    counts = {len(experts) for experts in pattern.layers.values()}
    if len(counts) != 1:
        raise PatternError(
            f"layers keep different expert counts {sorted(counts)}; a transformers config holds one expert count, "
            "so export needs a uniform pattern (select with top_k per layer)",
            field="pattern",
        )
    count = counts.pop()
    if routing.groups > 1:
        for layer, experts in pattern.layers.items():
            per_group = routing.group_counts(experts)
            if len(set(per_group)) != 1:
                raise PatternError(
                    f"keeps {per_group} experts per group; the exported config needs the same count in every group",
                    field=f"layer {layer}",
                )
    return count


def _router_layer(prefix, router_attr: str, moe_layers: tuple[int, ...], key: str) -> int | None:
    for layer in moe_layers:
        start = f"{prefix(layer)}{router_attr}."
        if key.startswith(start) and key[len(start) :] in _ROUTER_ROWS:
            return layer
    return None
