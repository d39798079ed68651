"""TLS and mutual TLS on the gRPC port, with certificates the tests make themselves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import PHOTOS, Authority, Issued, local_config

from edge_service import client, healthcheck
from edge_service.config import TLSConfig
from edge_service.server import RunningService, create_server
from smartbin.channel import open_channel
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


@dataclass
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    rogue_ca: Authority
    rogue_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "fleet-ca")
    rogue = Authority(folder, "rogue-ca")
    return Pki(
        ca,
        ca.issue("bin-0001", server=True),
        ca.issue("operator", server=False),
        rogue,
        rogue.issue("intruder", server=False),
    )


def a_photo() -> Path:
    return sorted(PHOTOS.rglob("*.jpg"))[0]


def serve(bundle: Path, tls: TLSConfig) -> RunningService:
    return create_server(local_config(bundle, tls=tls))


@pytest.fixture(scope="module")
def tls_service(default_bundle: Path, pki: Pki) -> Iterator[RunningService]:
    running = serve(default_bundle, TLSConfig(cert=pki.server.cert, key=pki.server.key))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def mtls_service(default_bundle: Path, pki: Pki) -> Iterator[RunningService]:
    tls = TLSConfig(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca.cert_path)
    running = serve(default_bundle, tls)
    yield running
    running.stop(grace=0)


def health_of(channel: grpc.Channel) -> int:
    return (
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    )


def refusal(channel: grpc.Channel) -> grpc.RpcError:
    with channel, pytest.raises(grpc.RpcError) as caught:
        health_of(channel)
    return caught.value


def test_tls_client_that_trusts_the_ca_is_served(tls_service: RunningService, pki: Pki) -> None:
    with open_channel(f"localhost:{tls_service.port}", ca=pki.ca.cert_path) as channel:
        assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_talk_to_a_tls_port(tls_service: RunningService) -> None:
    error = refusal(grpc.insecure_channel(f"127.0.0.1:{tls_service.port}"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_its_ca_did_not_sign(tls_service: RunningService, pki: Pki) -> None:
    channel = open_channel(f"localhost:{tls_service.port}", ca=pki.rogue_ca.cert_path)
    assert refusal(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_with_a_certificate_from_its_ca(
    mtls_service: RunningService, pki: Pki
) -> None:
    channel = open_channel(
        f"127.0.0.1:{mtls_service.port}",
        ca=pki.ca.cert_path,
        cert=pki.client.cert,
        key=pki.client.key,
    )
    with channel:
        image = a_photo().read_bytes()
        reply = classifier_pb2_grpc.ClassifierStub(channel).Classify(
            classifier_pb2.ClassifyRequest(image=image), timeout=10
        )
        assert reply.predictions


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mtls_refuses_a_client_without_a_valid_certificate(
    mtls_service: RunningService, pki: Pki, who: str
) -> None:
    target = f"localhost:{mtls_service.port}"
    if who == "no certificate":
        channel = open_channel(target, ca=pki.ca.cert_path)
    else:
        channel = open_channel(
            target, ca=pki.ca.cert_path, cert=pki.rogue_client.cert, key=pki.rogue_client.key
        )
    assert refusal(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_smartbin_classify_speaks_mtls(
    mtls_service: RunningService,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photo = a_photo()
    tls_flags = ["--ca", str(pki.ca.cert_path), "--cert", str(pki.client.cert)]
    tls_flags += ["--key", str(pki.client.key)]
    with pytest.raises(SystemExit) as done:
        client.main([str(photo), "--target", f"localhost:{mtls_service.port}", *tls_flags])
    assert done.value.code == 0
    assert photo.name in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        client.main([str(photo), "--target", f"localhost:{mtls_service.port}"])
    assert refused.value.code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_smartbin_classify_needs_both_cert_and_key(pki: Pki) -> None:
    with pytest.raises(SystemExit) as done:
        client.main(["x.jpg", "--cert", str(pki.client.cert)])
    assert done.value.code == 2


@pytest.mark.parametrize(
    "broken, fragment",
    [
        (lambda p, tmp: TLSConfig(cert=tmp / "missing.crt", key=p.server.key), "cannot read"),
        (lambda p, tmp: TLSConfig(cert=p.server.cert, key=p.client.key), "matching private key"),
        (
            lambda p, tmp: TLSConfig(cert=p.server.key, key=p.server.key),
            "not a valid PEM certificate chain",
        ),
    ],
    ids=["missing-file", "key-of-another-certificate", "key-as-certificate"],
)
def test_unusable_certificates_stop_start_with_a_clear_error(
    default_bundle: Path, pki: Pki, tmp_path: Path, broken, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        serve(default_bundle, broken(pki, tmp_path))


def test_healthcheck_speaks_mtls(
    mtls_service: RunningService, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", f"localhost:{mtls_service.port}"]
    tls_flags = ["--ca", str(pki.ca.cert_path), "--cert", str(pki.client.cert)]
    tls_flags += ["--key", str(pki.client.key)]
    with pytest.raises(SystemExit) as healthy:
        healthcheck.main([*target, *tls_flags])
    assert healthy.value.code == 0
    assert "SERVING" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        healthcheck.main(target)
    assert refused.value.code == 1
