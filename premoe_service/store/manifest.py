"""The store manifest: what a shard store holds and where each expert's bytes are."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataCorruption, FailedPrecondition, NotFound
from ..fsutil import atomic_write_bytes

STORE_FORMAT = 1
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise FailedPrecondition(f"expert dtype {dtype} is not supported by the store", field="dtype")


@dataclass(frozen=True)
class PartLayout:
    """One fused-parameter slice inside an expert's blob: name, shape, byte offset and length."""

    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class LayerFile:
    """The expert file of one MoE layer: expert e occupies bytes [e * nbytes, (e + 1) * nbytes)."""

    file: str
    checksums: list[str]


@dataclass
class Manifest:
    """Everything a reader needs to find, check and decode experts without opening the checkpoint.

    Attributes:
        family: Adapter name.
        fingerprint: Hash of the config and every tensor's checksum; namespaces caches and profiles.
        dtype: Dtype of the expert tensors.
        moe_layers: MoE decoder-layer indices.
        num_experts: Routed experts per MoE layer.
        expert_nbytes: Bytes of one expert (all experts of a model have the same shape).
        parts: Layout of one expert's blob.
        layers: Layer index -> its expert file and per-expert checksums (xxh3-64 hex).
        dense_checksum: xxh3-64 of the dense file's tensor bytes.
        source: Where the checkpoint came from and in which layout its experts were (`per_expert`/`fused`).
        quantized: Quantized copies of the experts by precision, as `premoe_service.store.quantized_copies` writes them.
    """

    family: str
    fingerprint: str
    dtype: str
    moe_layers: list[int]
    num_experts: int
    expert_nbytes: int
    parts: list[PartLayout]
    layers: dict[int, LayerFile]
    dense_checksum: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    quantized: dict[str, Any] = field(default_factory=dict)  # precision -> its copy (store/quantized_copies.py)
    format_version: int = STORE_FORMAT

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_nbytes * self.num_experts * len(self.moe_layers)

    def checksum(self, layer: int, expert: int) -> str:
        return self.layers[layer].checksums[expert]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = {str(k): asdict(v) for k, v in self.layers.items()}
        return data

    def save(self, store_dir: Path) -> None:
        atomic_write_bytes(store_dir / MANIFEST, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, store_dir: str | Path) -> Manifest:
        path = Path(store_dir) / MANIFEST
        if not path.exists():
            raise NotFound(f"{store_dir} is not a store: no {MANIFEST} (create one with `premoe shard`)", field="store")
        try:
            data = json.loads(path.read_text())
            version = data.get("format_version")
            if version != STORE_FORMAT:
                raise FailedPrecondition(
                    f"{path} has store format {version!r}; this build reads format {STORE_FORMAT}",
                    field="store",
                )
            parts = [PartLayout(p["name"], tuple(p["shape"]), p["offset"], p["nbytes"]) for p in data["parts"]]
            layers = {int(k): LayerFile(v["file"], list(v["checksums"])) for k, v in data["layers"].items()}
            manifest = cls(
                family=data["family"],
                fingerprint=data["fingerprint"],
                dtype=data["dtype"],
                moe_layers=[int(x) for x in data["moe_layers"]],
                num_experts=int(data["num_experts"]),
                expert_nbytes=int(data["expert_nbytes"]),
                parts=parts,
                layers=layers,
                dense_checksum=data.get("dense_checksum", ""),
                source=data.get("source", {}),
                quantized=dict(data.get("quantized", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataCorruption(f"{path} is damaged: {exc}", field="manifest") from exc
        manifest._check()
        return manifest

    def _check(self) -> None:
        if self.dtype not in DTYPES:
            raise DataCorruption(f"unknown dtype {self.dtype!r}", field="manifest.dtype")
        element = DTYPES[self.dtype].itemsize
        if sum(p.nbytes for p in self.parts) != self.expert_nbytes or any(
            p.nbytes != math.prod(p.shape) * element for p in self.parts
        ):
            raise DataCorruption("expert part sizes do not add up", field="manifest.parts")
        for layer in self.moe_layers:
            if layer not in self.layers or len(self.layers[layer].checksums) != self.num_experts:
                raise DataCorruption(f"layer {layer} lacks its expert file or checksums", field="manifest.layers")
