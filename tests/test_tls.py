"""Transport security: TLS and mutual TLS on both doors with certificates made here, and the refusal to open the
admin door to the network without a token."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from premoe_service.cli import main
from premoe_service.errors import InvalidArgument
from premoe_service.server import create_server, running_server
from premoe_service.server.gen import premoe_pb2 as pb
from premoe_service.server.gen import premoe_pb2_grpc as pb_grpc
from premoe_service.server.security import is_loopback
from premoe_service.serving import ServiceConfig

TOKEN = "tls-admin"


# --- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key: Path
    cert: Path

    @property
    def pem(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Issued:
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key_path, cert_path)


def make_ca(folder: Path, common: str) -> tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    return _write(folder, common, key, cert), key, cert


def issue(
    folder: Path, common: str, ca: tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate], *, server: bool
) -> Issued:
    _, ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(folder, common, key, builder.sign(ca_key, hashes.SHA256()))


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger_ca: Issued  # a CA the server does not trust
    stranger: Issued  # a client certificate it signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = make_ca(folder, "premoe-test-ca"), make_ca(folder, "stranger-ca")
    return Pki(
        ca[0],
        issue(folder, "server", ca, server=True),
        issue(folder, "client", ca, server=False),
        stranger_ca[0],
        issue(folder, "stranger", stranger_ca, server=False),
    )


# --- servers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tiny_store: Path) -> Path:
    return tiny_store


def config(store: Path, tmp_path: Path, **fields: object) -> ServiceConfig:
    return ServiceConfig(store=store, profiles=tmp_path, port=0, device="cpu", admin_token=TOKEN, **fields)


@pytest.fixture(scope="module")
def tls_server(store: Path, pki: Pki, embedder, tmp_path_factory) -> Iterator[tuple[object, int]]:
    cfg = config(store, tmp_path_factory.mktemp("p"), http_port=0, tls_cert=pki.server.cert, tls_key=pki.server.key)
    with running_server(cfg, embedder=embedder) as served:
        yield served


@pytest.fixture(scope="module")
def mtls_server(store: Path, pki: Pki, embedder, tmp_path_factory) -> Iterator[tuple[object, int]]:
    cfg = config(
        store,
        tmp_path_factory.mktemp("p"),
        http_port=0,
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca.cert,
    )
    with running_server(cfg, embedder=embedder) as served:
        yield served


def health(channel: grpc.Channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def secure(port: int, ca: Path | None, client: Issued | None = None) -> grpc.Channel:
    key, cert = client.pem if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca is not None else None, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as info:
        health(channel)
    return info.value.code()


def https(port: int, ca: Path | None, client: Issued | None = None, path: str = "/health") -> int:
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    with urllib.request.urlopen(f"https://localhost:{port}{path}", context=context, timeout=10) as reply:
        return int(reply.status)


# --- TLS -------------------------------------------------------------------------------------------------------


def test_a_client_with_the_ca_is_served_over_tls(tls_server, pki: Pki) -> None:
    _, port = tls_server
    with secure(port, pki.ca.cert) as channel:
        assert health(channel) == "SERVING"
        reply = pb_grpc.PreMoeStub(channel).Generate(pb.GenerateRequest(prompt="def f(x):", max_new_tokens=3))
        assert len(reply.token_ids) == 3


@pytest.mark.parametrize("client", ["no CA", "another CA", "plain text"])
def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_server, pki: Pki, client: str) -> None:
    _, port = tls_server
    channel = {
        "no CA": lambda: secure(port, None),  # the system's roots do not know a self-signed CA
        "another CA": lambda: secure(port, pki.stranger_ca.cert),
        "plain text": lambda: grpc.insecure_channel(f"localhost:{port}"),
    }[client]()
    assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_the_http_door_serves_https_with_the_same_certificate(tls_server, pki: Pki) -> None:
    handle, _ = tls_server
    assert https(handle.http_port, pki.ca.cert) == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https(handle.http_port, None)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to a TLS port gets no HTTP reply
        urllib.request.urlopen(f"http://localhost:{handle.http_port}/health", timeout=10)


# --- mutual TLS ----------------------------------------------------------------------------------------------


def test_mutual_tls_serves_a_client_with_a_certificate_of_the_ca(mtls_server, pki: Pki) -> None:
    handle, port = mtls_server
    with secure(port, pki.ca.cert, pki.client) as channel:
        assert health(channel) == "SERVING"
    assert https(handle.http_port, pki.ca.cert, pki.client, "/v1/models") == 200


@pytest.mark.parametrize("client", ["no certificate", "a stranger's certificate"])
def test_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca(mtls_server, pki: Pki, client: str) -> None:
    handle, port = mtls_server
    certificate = None if client == "no certificate" else pki.stranger
    assert refused(secure(port, pki.ca.cert, certificate)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https(handle.http_port, pki.ca.cert, certificate)


# --- the client verbs -------------------------------------------------------------------------------------------


def premoe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_client_verbs_reach_a_tls_server_with_its_ca(tls_server, pki: Pki, capsys) -> None:
    _, port = tls_server
    server = ["--server", f"localhost:{port}", "--timeout", "20"]
    assert premoe(capsys, "health", *server, "--tls-ca", str(pki.ca.cert))[:2] == (0, "SERVING\n")
    code, out, _ = premoe(
        capsys, "generate", "def f(x):", "--max-new-tokens", "2", *server, "--tls-ca", str(pki.ca.cert)
    )
    assert code == 0 and out.strip()
    for refused_with in (
        [],
        ["--tls"],
        ["--tls-ca", str(pki.stranger_ca.cert)],
    ):  # plain text, system roots, a stranger
        code, _, err = premoe(capsys, "health", *server, "--timeout", "5", *refused_with)
        assert code == 1 and "UNAVAILABLE" in err and "Traceback" not in err


def test_client_verbs_present_a_client_certificate_for_mutual_tls(mtls_server, pki: Pki, capsys) -> None:
    _, port = mtls_server
    server = ["--server", f"localhost:{port}", "--timeout", "10", "--tls-ca", str(pki.ca.cert)]
    mine = ["--tls-client-cert", str(pki.client.cert), "--tls-client-key", str(pki.client.key)]
    assert premoe(capsys, "health", *server, *mine)[:2] == (0, "SERVING\n")
    assert premoe(capsys, "health", *server)[0] == 1  # no certificate
    code, _, err = premoe(capsys, "health", *server, "--tls-client-cert", str(pki.client.cert))
    assert code == 2 and "--tls-client-key" in err and "Traceback" not in err


# --- what the server refuses to start with ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tls_cert": "server.pem"}, "tls_key"),
        ({"tls_key": "server.key"}, "tls_cert"),
        ({"tls_cert": "missing.pem", "tls_key": "server.key"}, "tls_cert"),
        ({"tls_client_ca": "premoe-test-ca.pem"}, "tls_client_ca"),
    ],
    ids=["cert without key", "key without cert", "missing file", "client CA without server TLS"],
)
def test_tls_options_that_do_not_go_together_are_refused(pki: Pki, tmp_path: Path, fields, field: str) -> None:
    folder = pki.ca.cert.parent
    with pytest.raises(InvalidArgument) as info:
        ServiceConfig(store=tmp_path, **{k: folder / v for k, v in fields.items()})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("cert", "key", "ca", "field"),
    [
        ("server.pem", "client.key", None, "tls_cert"),  # a key that is not the certificate's
        ("server.key", "server.key", None, "tls_cert"),  # not a certificate
        ("server.pem", "server.key", "server.key", "tls_client_ca"),  # not a CA bundle
    ],
    ids=["mismatched key", "key as certificate", "key as client CA"],
)
def test_tls_files_that_do_not_load_stop_the_start_before_the_model_loads(
    pki: Pki, tmp_path: Path, cert: str, key: str, ca: str | None, field: str
) -> None:
    folder = pki.ca.cert.parent
    cfg = ServiceConfig(
        store=tmp_path / "no-store",  # never opened: the files are checked first
        tls_cert=folder / cert,
        tls_key=folder / key,
        tls_client_ca=folder / ca if ca else None,
    )
    with pytest.raises(InvalidArgument) as info:
        create_server(cfg)
    assert info.value.field == field


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com", ""])
def test_a_non_loopback_bind_without_an_admin_token_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(InvalidArgument, match="allow_insecure_admin") as info:
        create_server(ServiceConfig(store=tmp_path / "no-store", host=host))
    assert info.value.field == "admin_token"


def test_a_non_loopback_bind_starts_with_a_token_or_when_allowed_and_warns(
    store: Path, embedder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="premoe_service.server.security"):
        allowed = ServiceConfig(
            store=store, profiles=tmp_path, host="0.0.0.0", port=0, device="cpu", allow_insecure_admin=True
        )
        with running_server(allowed, embedder=embedder) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as c:
            assert health(c) == "SERVING"
        assert "no admin token" in caplog.text
        caplog.clear()
        guarded = config(store, tmp_path, host="0.0.0.0")
        with running_server(guarded, embedder=embedder) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as c:
            assert health(c) == "SERVING"
        assert "no admin token" not in caplog.text and "without TLS" in caplog.text


def test_no_admin_token_on_loopback_starts_with_a_warning(
    store: Path, embedder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="premoe_service.server.security"):
        cfg = ServiceConfig(store=store, profiles=tmp_path, port=0, device="cpu")
        with running_server(cfg, embedder=embedder) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as c:
            assert health(c) == "SERVING"
    assert "no admin token is set" in caplog.text


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True)],
        *[("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.com", False), ("", False)],
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
