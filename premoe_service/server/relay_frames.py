"""The relay's framing, shared by both ends (the door process imports this, not the engine side's modules): each
frame is a message's length, four bytes big-endian, then the message (protos/premoe/relay/v1/relay.proto)."""

from __future__ import annotations

import struct
from typing import Any

HEADER = struct.Struct(">I")


def frame(message: Any) -> bytes:
    """A protobuf message as one relay frame."""
    body: bytes = message.SerializeToString()
    return HEADER.pack(len(body)) + body
