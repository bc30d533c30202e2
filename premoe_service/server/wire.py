"""Request bytes that protobuf refuses to decode become an `InvalidArgument` naming the field at fault."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from ..errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """What a tolerant deserializer hands the handler in place of a request it could not decode."""

    error: InvalidArgument


def tolerant(deserialize: Callable[[bytes], Any], message: Descriptor) -> Callable[[bytes], Any]:
    """Wrap a request deserializer so that undecodable bytes reach the handler as `Undecodable`.

    gRPC answers UNKNOWN when a deserializer raises; handing the failure on lets the one interceptor answer
    INVALID_ARGUMENT after the credentials are checked.
    """

    def run(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            return Undecodable(decode_error(message, raw))

    return run


def decode_error(message: Descriptor, raw: bytes) -> InvalidArgument:
    """The error for bytes that do not decode as `message`, naming the first field at fault when one is."""
    try:
        field = _bad_field(message, raw, "")
    except _Malformed:
        field = None
    if field is None:
        return InvalidArgument(
            f"the request does not decode as a {message.name} message (malformed protobuf bytes)", field="request"
        )
    return InvalidArgument("is not valid UTF-8 (string fields carry UTF-8 text)", field=field)


class _Malformed(Exception):
    """The bytes are broken beyond naming a field (a truncated varint or length, a group)."""


def _bad_field(message: Descriptor, raw: bytes, prefix: str) -> str | None:
    """The path of the first string field whose bytes are not UTF-8 (`stop[2]`), walking the wire format."""
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(raw):
        tag, pos = _varint(raw, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(raw, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(raw, pos)
            payload, pos = raw[pos : pos + size], pos + size
            if pos > len(raw):
                raise _Malformed
            field = message.fields_by_number.get(number)
            if field is None:
                continue
            index = seen[number] = seen.get(number, -1) + 1
            name = prefix + field.name + (f"[{index}]" if field.is_repeated else "")
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                inner = _bad_field(field.message_type, payload, name + ".")
                if inner is not None:
                    return inner
        else:
            raise _Malformed
    if pos > len(raw):
        raise _Malformed
    return None


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Malformed
