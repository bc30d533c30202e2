"""An expert's kept channels read from a store, at the precision a channel plan holds them.

Full precision: the expert's own tensors cut to the channels. A quantized precision: gate and up rows from the
store's copy (grouped along the hidden dim, so each row's integers and scales are its own and a row slice is
exact), and the down projection re-quantized channel-major (each channel's column as a row of the hidden size,
grouped along it), since the copy groups the down projection along the channels. That is the layout a store
would hold for contiguous channel reads: per expert and precision, channel after channel, each one its gate
row, up row and down column with their scales (docs/atomic-experts.md).
"""

from __future__ import annotations

from torch import Tensor

from ..families.channels import slice_channels
from ..pattern import FULL
from .quant import BITS, FLOAT_PRECISIONS, TRANSPOSED_FAMILIES, dequantize, quantize
from .quantized_copies import PrecisionReader
from .reader import Store


class ChannelReader:
    """Reads experts at a precision, whole or channel-major, and cuts them to channels (readers kept open)."""

    def __init__(self, store: Store, group_size: int | None = None) -> None:
        from .copies import quantized_copies

        self.store = store
        self.family = store.manifest.family
        self.transposed = self.family in TRANSPOSED_FAMILIES
        sizes = {c.group_size for c in quantized_copies(store.manifest).values() if c.group_size}
        self.group_size = group_size or (sizes.pop() if len(sizes) == 1 else 64)
        self._readers: dict[str, PrecisionReader] = {}

    def expert(self, layer: int, expert: int, precision: str, channel_major: bool) -> dict[str, Tensor]:
        """One expert's tensors (runtime layout, store dtype) at `precision`, dequantized; with `channel_major`
        the down projection is quantized per channel (what a channel slice computes with)."""
        full = self.store.read(layer, expert)
        if precision == FULL:
            return dict(full)
        reader = self._readers.get(precision)
        if reader is None:
            reader = self._readers[precision] = PrecisionReader(self.store, precision)
        tensors = reader.read_dequantized(layer, expert)
        if channel_major and precision not in FLOAT_PRECISIONS:
            down = full["down_proj"]
            rows = (down if self.transposed else down.t()).contiguous()  # [I, H]
            bits = BITS[precision]
            size = (int(rows.shape[0]), int(rows.shape[1]))
            back = dequantize(quantize(rows, bits, self.group_size), bits, self.group_size, size, rows.dtype)
            tensors["down_proj"] = back if self.transposed else back.t().contiguous()
        return tensors

    def channels(self, layer: int, expert: int, precision: str, kept: Tensor | None) -> dict[str, Tensor]:
        """One expert as a channel plan holds it: at `precision`, cut to `kept` channels (None: whole)."""
        if kept is None:
            return self.expert(layer, expert, precision, channel_major=False)
        return slice_channels(self.family, self.expert(layer, expert, precision, channel_major=True), kept)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
