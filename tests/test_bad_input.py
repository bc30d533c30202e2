"""Every malformed request at either door gets its documented code and a message naming the field: a table of
hand-written cases over every RPC (raw wire bytes that do not decode included), then property-based cases for the
string, number and bytes fields. Never UNKNOWN or INTERNAL, and the server stays healthy after each."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from premoe_service.errors import InvalidArgument, PermissionDenied, Unauthenticated
from premoe_service.families.tiny import save_tiny_checkpoint
from premoe_service.profiler import Demo
from premoe_service.server import running_server
from premoe_service.server.auth import Access
from premoe_service.server.gen import premoe_pb2 as pb
from premoe_service.serving import ServiceConfig
from premoe_service.store import shard

ADMIN, KEY = "admin-s3cret", "key-s3cret"
AS_ADMIN = (("authorization", f"Bearer {ADMIN}"),)
AS_USER = (("authorization", f"Bearer {KEY}"),)
KNOWN = "known"  # a task registered by the fixture
DEMOS = ["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n"]
LIMITS = {
    "max_new_tokens_limit": 64,
    "max_prompt_bytes": 1024,
    "max_description_bytes": 64,
    "max_demos": 4,
    "max_demo_bytes": 256,
    "max_demos_total_bytes": 600,
}
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
PROPERTY = settings(
    deadline=None,
    derandomize=True,
    max_examples=12,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[tuple[object, int]]:
    """One server on the tiny model (context: 256 positions), both doors, both credentials, small limits."""
    root = tmp_path_factory.mktemp("bad-input")
    save_tiny_checkpoint(root / "ckpt", "qwen3_moe")
    shard(root / "ckpt", root / "store", progress=False)
    (root / "profiles").mkdir()
    config = ServiceConfig(
        store=root / "store",
        profiles=root / "profiles",
        port=0,
        http_port=0,
        device="cpu",
        admin_token=ADMIN,
        api_key=KEY,
        **LIMITS,
    )
    with running_server(config, embedder=embedder) as (handle, port):
        handle.core.register_task(KNOWN, [Demo(d) for d in DEMOS])
        yield handle, port


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel


def call(
    channel: grpc.Channel, method: str, request: Message | bytes, metadata=AS_ADMIN
) -> tuple[grpc.StatusCode, str]:
    """Send `request` (a message, or raw bytes as they go on the wire) and return the status code and details."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    path = f"/premoe.v1.PreMoe/{method}"
    try:
        if method == "GenerateStream":
            for _ in channel.unary_stream(path)(raw, metadata=metadata, timeout=60):
                pass
        else:
            channel.unary_unary(path)(raw, metadata=metadata, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def assert_healthy(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def wire(number: int, payload: bytes) -> bytes:
    """One length-delimited field as protobuf writes it (to put bytes protobuf would never write)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


# --- the hand-written table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    method: str
    request: Message | bytes
    code: grpc.StatusCode
    named: str  # the field (or the name) the message must contain
    metadata: tuple[tuple[str, str], ...] = AS_ADMIN


G, R = pb.GenerateRequest, pb.RegisterTaskRequest
BAD_UTF8 = {"truncated": b"\xe2\x82", "lone byte": b"\xff", "surrogate": b"\xed\xa0\x80", "overlong": b"\xc0\xaf"}
GOOD_GENERATE = G(prompt="def f(x):", max_new_tokens=2).SerializeToString()

GENERATE: dict[str, tuple[Message | bytes, grpc.StatusCode, str]] = {
    "empty prompt": (G(prompt="", max_new_tokens=2), INVALID, "prompt"),
    "blank prompt": (G(prompt=" \n\t ", max_new_tokens=2), INVALID, "prompt"),
    "prompt over max_prompt_bytes": (G(prompt="x" * 1025, max_new_tokens=2), INVALID, "prompt"),
    "prompt over max_prompt_bytes in UTF-8": (G(prompt="é" * 513, max_new_tokens=2), INVALID, "prompt"),
    "prompt of 10 MB": (G(prompt="y" * (10 << 20), max_new_tokens=2), INVALID, "prompt"),
    "prompt over the context": (G(prompt="b" * 300, max_new_tokens=2), INVALID, "prompt"),
    "prompt and new tokens over the context": (G(prompt="a" * 200, max_new_tokens=60), INVALID, "max_new_tokens"),
    "negative max_new_tokens": (G(prompt="hi", max_new_tokens=-3), INVALID, "max_new_tokens"),
    "max_new_tokens over the limit": (G(prompt="hi", max_new_tokens=65), INVALID, "max_new_tokens"),
    "max_new_tokens int32 max": (G(prompt="hi", max_new_tokens=2**31 - 1), INVALID, "max_new_tokens"),
    "max_new_tokens int32 min": (G(prompt="hi", max_new_tokens=-(2**31)), INVALID, "max_new_tokens"),
    "temperature NaN": (G(prompt="hi", temperature=math.nan), INVALID, "temperature"),
    "temperature inf": (G(prompt="hi", temperature=math.inf), INVALID, "temperature"),
    "temperature -inf": (G(prompt="hi", temperature=-math.inf), INVALID, "temperature"),
    "negative temperature": (G(prompt="hi", temperature=-1.0), INVALID, "temperature"),
    "temperature over 10": (G(prompt="hi", temperature=11.0), INVALID, "temperature"),
    "top_p NaN": (G(prompt="hi", top_p=math.nan), INVALID, "top_p"),
    "top_p inf": (G(prompt="hi", top_p=math.inf), INVALID, "top_p"),
    "top_p over 1": (G(prompt="hi", top_p=1.5), INVALID, "top_p"),
    "negative top_p": (G(prompt="hi", top_p=-0.5), INVALID, "top_p"),
    "17 stop strings": (G(prompt="hi", stop=[f"s{i}" for i in range(17)]), INVALID, "stop"),
    "stop string of 257 characters": (G(prompt="hi", stop=["z" * 257]), INVALID, "stop"),
    "empty stop string": (G(prompt="hi", stop=["ok", ""]), INVALID, "stop"),
    "empty task": (G(prompt="hi", task=""), INVALID, "task"),
    "task with spaces": (G(prompt="hi", task="Bad Name!"), INVALID, "task"),
    "task of 65 characters": (G(prompt="hi", task="t" * 65), INVALID, "task"),
    "task of 1 MB": (G(prompt="hi", task="t" * (1 << 20)), INVALID, "task"),
    "task with a path": (G(prompt="hi", task="../etc"), INVALID, "task"),
    "task not ASCII": (G(prompt="hi", task="códe"), INVALID, "task"),
    "task with NUL": (G(prompt="hi", task="a\x00b"), INVALID, "task"),
    "unknown task": (G(prompt="hi", task="no-such-task", max_new_tokens=2), grpc.StatusCode.NOT_FOUND, "no-such-task"),
    **{f"prompt bytes {k}": (wire(1, v) + wire(1, b"ok"), INVALID, "prompt") for k, v in BAD_UTF8.items()},
    "task bytes not UTF-8": (GOOD_GENERATE + wire(2, b"co\xffde"), INVALID, "task"),
    "stop bytes not UTF-8": (GOOD_GENERATE + wire(7, b"ok") + wire(7, b"\xfe"), INVALID, "stop[1]"),
    "truncated message": (GOOD_GENERATE[:-1], INVALID, "request"),
    "length past the end": (wire(1, b"hello")[:-2], INVALID, "request"),
    "garbage bytes": (b"\xff" * 12, INVALID, "request"),
    "unterminated group": (b"\x0b\x08\x01", INVALID, "request"),
    "no API key": (G(prompt="hi", max_new_tokens=2), grpc.StatusCode.UNAUTHENTICATED, "authorization"),
}

ROUTE: dict[str, tuple[Message | bytes, grpc.StatusCode, str]] = {
    "empty prompt": (pb.RouteRequest(prompt=""), INVALID, "prompt"),
    "blank prompt": (pb.RouteRequest(prompt="\u3000\n"), INVALID, "prompt"),
    "prompt over max_prompt_bytes": (pb.RouteRequest(prompt="x" * 1025), INVALID, "prompt"),
    "prompt over max_prompt_bytes in UTF-8": (pb.RouteRequest(prompt="🙂" * 257), INVALID, "prompt"),
    "prompt of 10 MB": (pb.RouteRequest(prompt="y" * (10 << 20)), INVALID, "prompt"),
    **{f"prompt bytes {k}": (wire(1, b"route " + v), INVALID, "prompt") for k, v in BAD_UTF8.items()},
    "garbage bytes": (b"\x0a\xff\xff\xff\xff\xff", INVALID, "request"),
    "wrong API key": (pb.RouteRequest(prompt="hi"), grpc.StatusCode.UNAUTHENTICATED, "authorization"),
}

GOOD_REGISTER = R(name="fresh", demos=DEMOS, dry_run=True).SerializeToString()
REGISTER: dict[str, tuple[Message | bytes, grpc.StatusCode, str]] = {
    "empty name": (R(name="", demos=DEMOS), INVALID, "name"),
    "blank name": (R(name="  ", demos=DEMOS), INVALID, "name"),
    "name with capitals": (R(name="Code", demos=DEMOS), INVALID, "name"),
    "name with a slash": (R(name="a/b", demos=DEMOS), INVALID, "name"),
    "name with dots up": (R(name="../x", demos=DEMOS), INVALID, "name"),
    "name starting with a dash": (R(name="-x", demos=DEMOS), INVALID, "name"),
    "name of 65 characters": (R(name="n" * 65, demos=DEMOS), INVALID, "name"),
    "name of 1 MB": (R(name="n" * (1 << 20), demos=DEMOS), INVALID, "name"),
    "name not ASCII": (R(name="名前", demos=DEMOS), INVALID, "name"),
    "name with a newline": (R(name="a\nb", demos=DEMOS), INVALID, "name"),
    "no demos": (R(name="fresh", demos=[]), INVALID, "demos"),
    "empty demo": (R(name="fresh", demos=[""]), INVALID, "demos[0]"),
    "blank demo": (R(name="fresh", demos=["ok", " \n"]), INVALID, "demos[1]"),
    "more demos than max_demos": (R(name="fresh", demos=["d"] * 5), INVALID, "demos"),
    "demo over max_demo_bytes": (R(name="fresh", demos=["d" * 257]), INVALID, "demos[0]"),
    "demo over max_demo_bytes in UTF-8": (R(name="fresh", demos=["ok", "ü" * 129]), INVALID, "demos[1]"),
    "demos over max_demos_total_bytes": (R(name="fresh", demos=["d" * 250] * 3), INVALID, "demos"),
    "demo of 10 MB": (R(name="fresh", demos=["d" * (10 << 20)]), INVALID, "demos[0]"),
    "empty example": (R(name="fresh", demos=DEMOS, examples=[""]), INVALID, "examples[0]"),
    "blank example": (R(name="fresh", demos=DEMOS, examples=["ok", " \n"]), INVALID, "examples[1]"),
    "more examples than max_demos": (R(name="fresh", demos=DEMOS, examples=["e"] * 5), INVALID, "examples"),
    "example over max_demo_bytes": (R(name="fresh", demos=DEMOS, examples=["e" * 257]), INVALID, "examples[0]"),
    "demos and examples over max_demos_total_bytes": (
        R(name="fresh", demos=["d" * 250] * 2, examples=["e" * 250]),
        INVALID,
        "examples",
    ),
    "description over max_description_bytes": (
        R(name="fresh", demos=DEMOS, description="x" * 65),
        INVALID,
        "description",
    ),
    "description over the limit in UTF-8": (R(name="fresh", demos=DEMOS, description="€" * 22), INVALID, "description"),
    "description of 24 MB": (R(name="fresh", demos=DEMOS, description="x" * (24 << 20)), INVALID, "description"),
    "unknown criterion": (R(name="fresh", demos=DEMOS, criterion="magic"), INVALID, "criterion"),
    "criterion in capitals": (R(name="fresh", demos=DEMOS, criterion="FREQUENCY"), INVALID, "criterion"),
    "zero experts_per_layer": (R(name="fresh", demos=DEMOS, experts_per_layer=0), INVALID, "experts_per_layer"),
    "negative experts_per_layer": (R(name="fresh", demos=DEMOS, experts_per_layer=-1), INVALID, "experts_per_layer"),
    "zero fraction": (R(name="fresh", demos=DEMOS, fraction=0.0), INVALID, "fraction"),
    "fraction over 1": (R(name="fresh", demos=DEMOS, fraction=1.5), INVALID, "fraction"),
    "fraction NaN": (R(name="fresh", demos=DEMOS, fraction=math.nan), INVALID, "fraction"),
    "fraction inf": (R(name="fresh", demos=DEMOS, fraction=math.inf), INVALID, "fraction"),
    "fraction too small for a pattern": (R(name="fresh", demos=DEMOS, fraction=1e-30), INVALID, "fraction"),
    "zero bytes": (R(name="fresh", demos=DEMOS, bytes=0), INVALID, "bytes"),
    "negative bytes": (R(name="fresh", demos=DEMOS, bytes=-(2**63)), INVALID, "bytes"),
    "bytes too few for a pattern": (R(name="fresh", demos=DEMOS, bytes=1), INVALID, "bytes"),
    "existing name": (R(name=KNOWN, demos=DEMOS), grpc.StatusCode.ALREADY_EXISTS, KNOWN),
    "name bytes not UTF-8": (GOOD_REGISTER + wire(1, b"fr\xc3"), INVALID, "name"),
    "description bytes not UTF-8": (GOOD_REGISTER + wire(2, b"\xed\xb0\x80"), INVALID, "description"),
    "demo bytes not UTF-8": (GOOD_REGISTER + wire(3, b"\x80"), INVALID, "demos[2]"),
    "criterion bytes not UTF-8": (GOOD_REGISTER + wire(4, b"\xff"), INVALID, "criterion"),
    "truncated message": (GOOD_REGISTER[:-3], INVALID, "request"),
    "no token": (R(name="fresh", demos=DEMOS), grpc.StatusCode.UNAUTHENTICATED, "authorization"),
    "the API key for the admin token": (
        R(name="fresh", demos=DEMOS),
        grpc.StatusCode.PERMISSION_DENIED,
        "authorization",
    ),
}

NAMED = {
    "GetTask": pb.GetTaskRequest,
    "DeleteTask": pb.DeleteTaskRequest,
    "LoadTask": pb.LoadTaskRequest,
    "UnloadTask": pb.UnloadTaskRequest,
}
L = pb.LoadTaskRequest
LIFECYCLE: dict[str, tuple[str, Message, grpc.StatusCode, str]] = {
    "negative timeout": ("LoadTask", L(name=KNOWN, timeout_s=-1.0), INVALID, "timeout_s"),
    "timeout nan": ("LoadTask", L(name=KNOWN, timeout_s=math.nan), INVALID, "timeout_s"),
    "timeout inf": ("LoadTask", L(name=KNOWN, timeout_s=math.inf), INVALID, "timeout_s"),
    "unknown precision": ("LoadTask", L(name=KNOWN, precision="int7"), INVALID, "precision"),
    "a precision without slots": ("LoadTask", L(name=KNOWN, precision="int4"), INVALID, "precision"),
    "no token": ("LoadTask", L(name=KNOWN, pin=True), grpc.StatusCode.UNAUTHENTICATED, "authorization"),
    "the API key for the admin token": (
        "LoadTask",
        L(name=KNOWN, pin=True),
        grpc.StatusCode.PERMISSION_DENIED,
        "authorization",
    ),
}
NAME_CASES: dict[str, tuple[str | bytes, grpc.StatusCode, str]] = {
    "empty name": ("", INVALID, "name"),
    "name with capitals": ("Known", INVALID, "name"),
    "name of 1 MB": ("k" * (1 << 20), INVALID, "name"),
    "name with a path": ("../../etc/passwd", INVALID, "name"),
    "unknown name": ("missing", grpc.StatusCode.NOT_FOUND, "missing"),
    "name bytes not UTF-8": (wire(1, b"kn\xffown"), INVALID, "name"),
    "garbage bytes": (b"\x0a\x80", INVALID, "request"),
}

EMPTY = {"ListTasks": pb.ListTasksRequest, "GetStats": pb.GetStatsRequest}
EMPTY_CASES: dict[str, tuple[bytes | None, grpc.StatusCode, str]] = {
    "garbage bytes": (b"\xff\xff\xff\xff", INVALID, "request"),
    "truncated varint": (b"\x08\x80", INVALID, "request"),
    "length past the end": (b"\x0a\x05ab", INVALID, "request"),
    "no API key": (None, grpc.StatusCode.UNAUTHENTICATED, "authorization"),
}

METADATA = {
    "no API key": (),
    "no token": (),
    "wrong API key": (("authorization", "Bearer nope"),),
    "the API key for the admin token": AS_USER,
}


def table() -> Iterator[object]:
    def param(method: str, label: str, request: Message | bytes, code: grpc.StatusCode, named: str) -> object:
        case = Case(method, request, code, named, METADATA.get(label, AS_ADMIN))
        return pytest.param(case, id=f"{method}: {label}")

    for method in ("Generate", "GenerateStream"):
        for label, (request, code, named) in GENERATE.items():
            yield param(method, label, request, code, named)
    for label, (request, code, named) in ROUTE.items():
        yield param("Route", label, request, code, named)
    for label, (request, code, named) in REGISTER.items():
        yield param("RegisterTask", label, request, code, named)
    for method, message in NAMED.items():
        for label, (name, code, named) in NAME_CASES.items():
            yield param(method, label, name if isinstance(name, bytes) else message(name=name), code, named)
    for label, (method, request, code, named) in LIFECYCLE.items():
        yield param(method, label, request, code, named)
    yield param(
        "UnloadTask", "no token", pb.UnloadTaskRequest(name=KNOWN), grpc.StatusCode.UNAUTHENTICATED, "authorization"
    )
    for method, message in EMPTY.items():
        for label, (raw, code, named) in EMPTY_CASES.items():
            yield param(method, label, message() if raw is None else raw, code, named)


CASES = list(table())


def test_the_table_covers_every_rpc_with_80_cases() -> None:
    methods = {case.values[0].method for case in CASES}
    assert methods == set(pb.DESCRIPTOR.services_by_name["PreMoe"].methods_by_name)
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_request_gets_its_code_and_names_the_field(channel, case: Case) -> None:
    code, details = call(channel, case.method, case.request, case.metadata)
    assert (code, case.named in details) == (case.code, True), details
    assert len(details) <= 400  # a long input is never echoed whole into the trailer
    assert_healthy(channel)


def test_the_server_still_serves_after_the_table(channel) -> None:
    assert call(channel, "Generate", G(prompt="def f(x):", max_new_tokens=2)) == (OK, "")
    assert call(channel, "GetTask", pb.GetTaskRequest(name=KNOWN)) == (OK, "")


# --- property-based cases -------------------------------------------------------------------------------


def check(channel: grpc.Channel, method: str, request: Message | bytes, fields: set[str], *also: grpc.StatusCode):
    """The reply is OK, or INVALID_ARGUMENT (or one of `also`) with a message that names one of `fields`."""
    code, details = call(channel, method, request)
    assert code not in NEVER, details
    assert code in {OK, INVALID, *also}, (code, details)
    if code != OK:
        assert any(f in details for f in fields), details
    assert_healthy(channel)
    return code


TEXT = st.text(max_size=80)
WILD_TEXT = st.one_of(TEXT, st.text(alphabet=st.characters(codec="utf-8"), min_size=60, max_size=400))


@PROPERTY
@given(prompt=WILD_TEXT, stop=st.lists(TEXT, max_size=18), task=st.none() | TEXT)
def test_any_text_in_generate(channel, prompt: str, stop: list[str], task: str | None) -> None:
    request = G(prompt=prompt, stop=stop, max_new_tokens=1, task=task)
    check(channel, "Generate", request, {"prompt", "stop", "task", "max_new_tokens"}, grpc.StatusCode.NOT_FOUND)


@PROPERTY
@given(prompt=WILD_TEXT)
def test_any_text_in_route(channel, prompt: str) -> None:
    check(channel, "Route", pb.RouteRequest(prompt=prompt), {"prompt"})


@PROPERTY
@given(name=TEXT.filter(lambda n: n != KNOWN), method=st.sampled_from(sorted(NAMED)))
def test_any_task_name(channel, name: str, method: str) -> None:
    check(channel, method, NAMED[method](name=name), {"name"}, grpc.StatusCode.NOT_FOUND)


@PROPERTY
@given(name=TEXT, description=WILD_TEXT, demos=st.lists(WILD_TEXT, max_size=6), criterion=TEXT)
def test_any_text_in_register(channel, name: str, description: str, demos: list[str], criterion: str) -> None:
    request = R(name=name, description=description, demos=demos, criterion=criterion, dry_run=True)
    check(
        channel, "RegisterTask", request, {"name", "description", "demos", "criterion"}, grpc.StatusCode.ALREADY_EXISTS
    )


FLOAT32 = st.floats(width=32)  # NaN, infinities, subnormals and all


@PROPERTY
@given(
    max_new_tokens=st.integers(-(2**31), 2**31 - 1),
    temperature=FLOAT32,
    top_p=FLOAT32,
    seed=st.none() | st.integers(0, 2**64 - 1),
)
def test_any_numbers_in_generate(channel, max_new_tokens: int, temperature: float, top_p: float, seed) -> None:
    request = G(prompt="def f(x):", max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    check(channel, "GenerateStream", request, {"max_new_tokens", "temperature", "top_p"})


@PROPERTY
@given(
    selection=st.one_of(
        st.builds(lambda v: {"experts_per_layer": v}, st.integers(-(2**31), 2**31 - 1)),
        st.builds(lambda v: {"fraction": v}, FLOAT32),
        st.builds(lambda v: {"bytes": v}, st.integers(-(2**63), 2**63 - 1)),
    )
)
def test_any_selection_numbers_in_register(channel, selection: dict[str, float]) -> None:
    [(field, _)] = selection.items()
    check(channel, "RegisterTask", R(name="fresh", demos=DEMOS, dry_run=True, **selection), {field})


REQUEST_TYPES = {
    name: getattr(pb, method.input_type.name)
    for name, method in pb.DESCRIPTOR.services_by_name["PreMoe"].methods_by_name.items()
}
VALID = {
    "Generate": G(prompt="def f(x):", max_new_tokens=1).SerializeToString(),
    "GenerateStream": G(prompt="def f(x):", max_new_tokens=1).SerializeToString(),
    "Route": pb.RouteRequest(prompt="def f(x):").SerializeToString(),
    "RegisterTask": R(name="fresh", demos=DEMOS, dry_run=True).SerializeToString(),
    "GetTask": pb.GetTaskRequest(name=KNOWN).SerializeToString(),
    "DeleteTask": b"",
    "LoadTask": pb.LoadTaskRequest(name=KNOWN).SerializeToString(),
    "UnloadTask": pb.UnloadTaskRequest(name=KNOWN).SerializeToString(),
}
STRING_FIELDS = [
    (method, field.number, field.name)
    for method, message in REQUEST_TYPES.items()
    for field in message.DESCRIPTOR.fields
    if field.type == field.TYPE_STRING
]


@PROPERTY
@given(method=st.sampled_from(sorted(REQUEST_TYPES)), raw=st.binary(max_size=64))
def test_any_bytes_as_a_request(channel, method: str, raw: bytes) -> None:
    if method == "DeleteTask" and KNOWN.encode() in raw:
        return  # a valid deletion of the fixture's task is not a bad input
    fields = {f.name for f in REQUEST_TYPES[method].DESCRIPTOR.fields} | {"request"}
    check(channel, method, raw, fields, grpc.StatusCode.NOT_FOUND)


@PROPERTY
@given(target=st.sampled_from(STRING_FIELDS), payload=st.binary(max_size=32))
def test_any_bytes_in_a_string_field(channel, target: tuple[str, int, str], payload: bytes) -> None:
    method, number, name = target
    if method == "DeleteTask" and payload == KNOWN.encode():
        return  # a valid deletion of the fixture's task is not a bad input
    # A valid request, then the field: a repeated one gains an item, a singular one takes the last value.
    code = check(channel, method, VALID[method] + wire(number, payload), {name}, grpc.StatusCode.NOT_FOUND)
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        assert code == INVALID  # bytes that are not UTF-8 are never taken as text


@PROPERTY
@given(given=st.one_of(st.binary(max_size=40), st.text(max_size=40)), admin=st.booleans())
def test_credentials_of_any_bytes_are_refused_by_the_comparison_not_an_error(given: bytes | str, admin: bool) -> None:
    access = Access(ADMIN, KEY)
    with pytest.raises((Unauthenticated, PermissionDenied)) as info:
        access.check(given, admin=admin)
    assert info.value.field == "authorization"
    for secret in (b"Bearer " + ADMIN.encode(), f"bearer {ADMIN}", ADMIN.encode() + b" "):
        access.check(secret, admin=admin)  # the secret itself opens either kind of call


@pytest.mark.parametrize("secret", ["tökén", "tab\there", " padded", "nul\x00", "\udcff"])
@pytest.mark.parametrize("field", ["admin_token", "api_key"])
def test_a_secret_no_client_could_send_is_refused_at_start(secret: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Access(**{field: secret})
    assert info.value.field == field


# --- the HTTP door ----------------------------------------------------------------------------------------


def post(server, body: bytes, authorization: str = f"Bearer {KEY}", path: str = "/v1/completions"):
    handle, _ = server
    request = urllib.request.Request(
        f"http://127.0.0.1:{handle.http_port}{path}",
        data=body if path.endswith("completions") else None,
        headers={"content-type": "application/json", "authorization": authorization},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def completion(**fields: object) -> bytes:
    return json.dumps({"model": "auto", "prompt": "def f(x):", "max_tokens": 2, **fields}).encode()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "auto", "prompt": "\xff\xfe"}', 400, "body"),
        (b"[" * 100_000, 400, "body"),
        (b'{"model": "auto", "prompt": "\\ud800 lone", "max_tokens": 2}', 400, "prompt"),
        (completion(stop=["\udc00"]), 400, "stop"),
        (completion(temperature=math.nan), 400, "temperature"),
        (completion(top_p=math.inf), 400, "top_p"),
        (completion(max_tokens=10**30), 400, "max_tokens"),
        (completion(max_tokens=1.5), 400, "max_tokens"),
        (completion(prompt="x" * 1025), 400, "prompt"),
        (completion(prompt="a" * 200, max_tokens=60), 400, "max_tokens"),
        (completion(stop=["s"] * 17), 400, "stop"),
        (completion(model="Bad Name!"), 400, "model"),
        (completion(model="missing"), 404, "model"),
        (completion(seed=-1), 400, "seed"),
    ],
    ids=[
        "body not UTF-8",
        "nested too deeply",
        "lone surrogate in the prompt",
        "lone surrogate in a stop string",
        "temperature NaN",
        "top_p inf",
        "huge max_tokens",
        "fractional max_tokens",
        "prompt over max_prompt_bytes",
        "over the context",
        "17 stop strings",
        "bad model name",
        "unknown model",
        "negative seed",
    ],
)
def test_the_http_door_maps_bad_input_the_same_way(server, body: bytes, status: int, param: str) -> None:
    code, reply = post(server, body)
    assert (code, reply["error"]["param"]) == (status, param), reply
    assert param in reply["error"]["message"]
    assert post(server, completion())[0] == 200


@pytest.mark.parametrize("authorization", ["Bearer nope", "Bearer k\xe9y", "Bearer \xff\xfe", "Basic a2V5", ""])
def test_the_http_door_refuses_any_wrong_key_bytes_as_unauthenticated(server, authorization: str) -> None:
    code, reply = post(server, completion(), authorization)
    assert code == 401 and reply["error"]["param"] == "authorization"


def test_the_http_door_refuses_a_bad_model_path(server) -> None:
    code, reply = post(server, b"", path="/v1/models/Bad%20Name")
    assert (code, reply["error"]["param"]) == (400, "model")
