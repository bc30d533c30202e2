"""Safetensors I/O without holding a model in memory: a lazy checkpoint reader and a streaming writer."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import DataCorruption, NotFound
from ..fsutil import atomic_writer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_FROM_ST = {code: dtype for dtype, code in _ST_DTYPES.items()}


class CheckpointReader:
    """Reads tensors of a single-file or sharded (with an index) safetensors checkpoint, one at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index_path, single = self.model_dir / INDEX, self.model_dir / SINGLE
        if index_path.exists():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (KeyError, json.JSONDecodeError) as exc:
                raise DataCorruption(f"{index_path} has no readable weight_map: {exc}", field=INDEX) from exc
            self.files = sorted(set(weight_map.values()))
            self.key_file = dict(weight_map)
        elif single.exists():
            self.files = [SINGLE]
            self.key_file = {}
        else:
            raise NotFound(f"{self.model_dir} holds neither {SINGLE} nor {INDEX}", field="model_dir")
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        for name in self.files:
            path = self.model_dir / name
            if not path.exists():
                raise NotFound(f"checkpoint shard {path} is missing", field=name)
            self._handles[name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        if not self.key_file:
            self.key_file = {key: SINGLE for key in self._handles[SINGLE].keys()}  # noqa: SIM118

    def names(self) -> list[str]:
        return sorted(self.key_file)

    def tensor(self, key: str) -> torch.Tensor:
        return self._handles[self.key_file[key]].get_tensor(key)

    def slice(self, key: str, index: int) -> torch.Tensor:
        """Row `index` of a tensor, read without loading the rest."""
        return self._handles[self.key_file[key]].get_slice(key)[index]

    def dtype(self, key: str) -> torch.dtype:
        code = self._handles[self.key_file[key]].get_slice(key).get_dtype()
        return _FROM_ST[code]

    def shape(self, key: str) -> list[int]:
        return list(self._handles[self.key_file[key]].get_slice(key).get_shape())

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in its dtype, without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_safetensors_streaming(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file whose tensors arrive one by one, in `specs` order (atomically)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = dtype.itemsize * _numel(shape)
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
    with atomic_writer(path) as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                # The source changed under us or disagrees with its own header: nothing is written.
                raise DataCorruption(
                    f"tensor is {tensor.dtype}{tuple(tensor.shape)} but was declared {dtype}{shape}", field=name
                )
            handle.write(tensor_bytes(tensor))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
