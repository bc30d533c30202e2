"""`premoe shard`: split a transformers MoE checkpoint into a dense file and one contiguous blob per expert."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import AlreadyExists, DataCorruption, InvalidArgument, UnsupportedModel
from ..families import ExpertKey, FamilyAdapter, adapter_for
from ..fsutil import atomic_writer, disk_error, ensure_folder, remove_stale_temps
from .checkpoint_io import INDEX, CheckpointReader, tensor_bytes, write_safetensors_streaming
from .manifest import DENSE, LayerFile, Manifest, PartLayout, dtype_name

EXPERTS_DIR = "experts"


@dataclass
class ShardResult:
    manifest: Manifest
    created: bool  # False when the store was already there for this checkpoint


def checkpoint_digest(model_dir: Path) -> str:
    """The identity of a checkpoint: xxh3 of its config and of every safetensors file's full bytes."""
    digest = xxhash.xxh3_128((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def shard(model_dir: str | Path, out: str | Path, *, progress: bool = True) -> ShardResult:
    """Write a store for the checkpoint in `model_dir` (see DESIGN.md section 2).

    Reads tensor by tensor (one expert at a time), so memory stays far below the model's size. A rerun
    for the same checkpoint is a no-op; a store of another checkpoint at `out` is refused.
    """
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise InvalidArgument(f"{model_dir} has no config.json: not a transformers checkpoint", field="model_dir")
    for folder in (out, out / EXPERTS_DIR):
        remove_stale_temps(folder)  # of a run that was killed mid-write
    digest = checkpoint_digest(model_dir)
    if (out / "manifest.json").exists():
        existing = Manifest.load(out)
        if existing.source.get("checkpoint_digest") == digest:
            return ShardResult(existing, created=False)
        raise AlreadyExists(f"{out} already holds a store of another checkpoint; choose another --out", field="out")

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    with CheckpointReader(model_dir) as reader:
        plan = _plan(adapter, reader, spec.moe_layers, spec.num_experts)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
        parts = _part_layout(adapter, skeleton, spec.moe_layers[0], plan.dtype)
        dense_names = _check_dense(adapter, skeleton, plan, config)

        ensure_folder(out / EXPERTS_DIR)
        checksums: dict[int, list[str]] = {}
        bar = tqdm(
            total=len(spec.moe_layers) * spec.num_experts,
            desc="shard experts",
            unit="expert",
            disable=not progress,
        )
        for layer in spec.moe_layers:
            checksums[layer] = _write_layer(out / _layer_file(layer), plan, reader, layer, spec.num_experts, parts, bar)
        bar.close()
        dense_checksum = _write_dense(out / DENSE, reader, dense_names)

    fingerprint = hashlib.sha256(json.dumps(_identity(config.to_dict()), sort_keys=True, default=str).encode())
    fingerprint.update(dense_checksum.encode())
    for layer in spec.moe_layers:
        fingerprint.update("".join(checksums[layer]).encode())
    manifest = Manifest(
        family=adapter.name,
        fingerprint=fingerprint.hexdigest()[:32],
        dtype=dtype_name(plan.dtype),
        moe_layers=list(spec.moe_layers),
        num_experts=spec.num_experts,
        expert_nbytes=sum(p.nbytes for p in parts),
        parts=parts,
        layers={layer: LayerFile(_layer_file(layer), checksums[layer]) for layer in spec.moe_layers},
        dense_checksum=dense_checksum,
        source={"model_dir": str(model_dir.resolve()), "layout": plan.layout, "checkpoint_digest": digest},
    )
    for path in model_dir.iterdir():  # config, generation config, tokenizer
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX:
            try:
                shutil.copy2(path, out / path.name)
            except OSError as exc:
                raise disk_error(exc, out / path.name) from exc
    manifest.save(out)  # written last: its presence marks a complete store
    return ShardResult(manifest, created=True)


def _identity(config: dict) -> dict:
    """The config fields that define the model: not where it was loaded from, nor the library version."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def _layer_file(layer: int) -> str:
    return f"{EXPERTS_DIR}/layer_{layer:03d}.bin"


@dataclass
class _Plan:
    """Where each runtime expert parameter comes from, and which checkpoint keys are dense."""

    fused: dict[tuple[int, str], str]  # (layer, param) -> key of a stacked [E, ...] tensor
    per_expert: dict[tuple[int, int, str], list[tuple[int, int, str]]]  # (layer, e, param) -> (index, dim, key)
    dense: list[str]
    dtype: torch.dtype
    layout: str


def _plan(adapter: FamilyAdapter, reader: CheckpointReader, moe_layers: tuple[int, ...], num_experts: int) -> _Plan:
    fused: dict[tuple[int, str], str] = {}
    per_expert: dict[tuple[int, int, str], list[tuple[int, int, str]]] = defaultdict(list)
    dense: list[str] = []
    dtype: torch.dtype | None = None
    for key in reader.names():
        if key.endswith(("_blocks", "_scales")):
            raise UnsupportedModel(f"quantized expert tensor {key}: shard a dequantized checkpoint", field=key)
        parsed: ExpertKey | None = adapter.parse_expert_key(key)
        if parsed is None or parsed.layer not in moe_layers:
            dense.append(key)
            continue
        if parsed.expert is None:
            fused[(parsed.layer, parsed.part.param)] = key
        else:
            per_expert[(parsed.layer, parsed.expert, parsed.part.param)].append(
                (parsed.part.index, parsed.part.dim, key)
            )
        if dtype is None and not key.endswith("_bias"):
            dtype = reader.dtype(key)
    if dtype is None:
        raise UnsupportedModel("the checkpoint holds no routed-expert tensors", field="model_dir")
    return _Plan(fused, dict(per_expert), dense, dtype, "fused" if fused else "per_expert")


def _part_layout(adapter: FamilyAdapter, skeleton: torch.nn.Module, layer: int, dtype: torch.dtype) -> list[PartLayout]:
    parts, offset = [], 0
    for name, param in adapter.experts(skeleton, layer).named_parameters(recurse=False):
        shape = tuple(param.shape[1:])
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        parts.append(PartLayout(name, shape, offset, nbytes))
        offset += nbytes
    return parts


def _check_dense(
    adapter: FamilyAdapter, skeleton: torch.nn.Module, plan: _Plan, config: object
) -> list[tuple[str, str]]:
    """Pair dense checkpoint keys with runtime names, and check they cover the model exactly."""
    expert_params = {
        f"{adapter.runtime_prefix(layer)}{adapter.experts_attr}.{name}"
        for layer in adapter.spec(config).moe_layers
        for name, _ in adapter.experts(skeleton, layer).named_parameters(recurse=False)
    }
    wanted = set(skeleton.state_dict()) - expert_params
    pairs = [(key, adapter.runtime_dense_key(key)) for key in plan.dense]
    have = {runtime for _, runtime in pairs}
    missing = wanted - have
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")
    unexpected = have - wanted
    if missing or unexpected:
        raise DataCorruption(
            f"checkpoint does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}",
            field="model_dir",
        )
    return pairs


def _expert_tensors(
    plan: _Plan, reader: CheckpointReader, layer: int, expert: int, parts: list[PartLayout]
) -> list[torch.Tensor]:
    tensors = []
    for part in parts:
        key = plan.fused.get((layer, part.name))
        if key is not None:
            tensor = reader.slice(key, expert)
        else:
            pieces = sorted(plan.per_expert.get((layer, expert, part.name), []))
            if not pieces:
                raise DataCorruption(f"no tensor for {part.name} of expert {expert}", field=f"layer {layer}")
            tensor = torch.cat([reader.tensor(key) for _, _, key in pieces], dim=pieces[0][1])
        if tuple(tensor.shape) != part.shape:
            raise DataCorruption(
                f"expert {expert} {part.name} has shape {tuple(tensor.shape)}, the config implies {part.shape}",
                field=f"layer {layer}",
            )
        tensors.append(tensor.to(plan.dtype))
    return tensors


def _write_layer(
    path: Path,
    plan: _Plan,
    reader: CheckpointReader,
    layer: int,
    num_experts: int,
    parts: list[PartLayout],
    bar: tqdm,
) -> list[str]:
    checksums = []
    with atomic_writer(path) as handle:
        for expert in range(num_experts):
            hasher = xxhash.xxh3_64()
            for tensor in _expert_tensors(plan, reader, layer, expert, parts):
                data = tensor_bytes(tensor)
                hasher.update(data)
                handle.write(data)
            checksums.append(hasher.hexdigest())
            bar.update()
    return checksums


def _write_dense(path: Path, reader: CheckpointReader, names: list[tuple[str, str]]) -> str:
    hasher = xxhash.xxh3_64()
    specs = [(runtime, reader.dtype(key), tuple(reader.shape(key))) for key, runtime in names]

    def tensors():  # one at a time, hashed on the way out
        for key, _ in names:
            tensor = reader.tensor(key)
            hasher.update(tensor_bytes(tensor))
            yield tensor

    write_safetensors_streaming(path, specs, tensors(), metadata={"format": "pt"})
    return hasher.hexdigest()
