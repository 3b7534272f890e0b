"""TLS + token on a real coordinator (port 0): a self-signed server certificate made here; a TLS
client with the token is served, a plaintext client and a TLS client without the token are not."""

from __future__ import annotations

import datetime
import ipaddress

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from recovery._proto import coordinator_pb2 as pb  # noqa: E402
from recovery._proto import coordinator_pb2_grpc as pb_grpc  # noqa: E402
from recovery._proto import health_pb2, health_pb2_grpc  # noqa: E402
from recovery.server import build_server  # noqa: E402

TOKEN = "tls-s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
DEADLINE = 5.0


def self_signed() -> tuple[bytes, bytes]:
    """``(key_pem, cert_pem)`` of a one-day certificate for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def tls_server():
    key, cert = self_signed()
    srv, port = build_server("127.0.0.1:0", state_dir=None, token=TOKEN, tls=(key, cert))
    srv.start()
    yield port, cert
    srv.stop(1)


def test_tls_client_with_token_is_served(tls_server) -> None:
    port, cert = tls_server
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=cert)) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:  # authenticated: gets past auth to the core
            pb_grpc.CoordinatorStub(ch).GetLatestSteps(pb.GetLatestStepsRequest(job="j"), timeout=DEADLINE,
                                                       metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_tls_client_without_token_is_unauthenticated(tls_server) -> None:
    port, cert = tls_server
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=cert)) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.GetLatestSteps(pb.GetLatestStepsRequest(job="j"), timeout=DEADLINE, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_client_is_rejected(tls_server) -> None:
    port, _ = tls_server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.CoordinatorStub(ch).GetLatestSteps(pb.GetLatestStepsRequest(job="j"), timeout=2.0, metadata=AUTH)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_client_trusting_another_certificate_is_rejected(tls_server) -> None:
    port, _ = tls_server
    _, other = self_signed()
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=other)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.CoordinatorStub(ch).GetLatestSteps(pb.GetLatestStepsRequest(job="j"), timeout=2.0, metadata=AUTH)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
