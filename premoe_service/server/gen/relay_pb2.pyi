from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayCalls(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[RelayCall]
    def __init__(self, calls: _Optional[_Iterable[_Union[RelayCall, _Mapping]]] = ...) -> None: ...

class RelayCall(_message.Message):
    __slots__ = ("id", "start", "cancel")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: Start
    cancel: bool
    def __init__(self, id: _Optional[int] = ..., start: _Optional[_Union[Start, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("request", "stream", "timeout_s", "authorization", "http")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    request: bytes
    stream: bool
    timeout_s: float
    authorization: str
    http: HttpCall
    def __init__(self, request: _Optional[bytes] = ..., stream: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., authorization: _Optional[str] = ..., http: _Optional[_Union[HttpCall, _Mapping]] = ...) -> None: ...

class HttpCall(_message.Message):
    __slots__ = ("path", "body")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    path: str
    body: bytes
    def __init__(self, path: _Optional[str] = ..., body: _Optional[bytes] = ...) -> None: ...

class RelayBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[RelayEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[RelayEvent, _Mapping]]] = ...) -> None: ...

class RelayEvent(_message.Message):
    __slots__ = ("id", "reply", "end", "code", "details", "http_status", "http_stream")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    HTTP_STREAM_FIELD_NUMBER: _ClassVar[int]
    id: int
    reply: bytes
    end: bool
    code: int
    details: str
    http_status: int
    http_stream: bool
    def __init__(self, id: _Optional[int] = ..., reply: _Optional[bytes] = ..., end: _Optional[bool] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., http_status: _Optional[int] = ..., http_stream: _Optional[bool] = ...) -> None: ...
