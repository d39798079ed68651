"""Calls that change the bin need an operator: on the public port only a mutual-TLS client whose
certificate is named in admin.allowed_clients may reload the model; on the bin itself the
loopback admin listener serves it. Classify stays as open as the port is."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from helpers import PHOTOS, Authority, Issued, copy_bundle, local_config, metric
from pydantic import ValidationError

from edge_service import admin
from edge_service.config import ServiceConfig
from edge_service.server import RunningService, create_server
from smartbin.bundle import Bundle
from smartbin.channel import open_channel
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

REFUSED_RELOADS = 'smartbin_requests_total{code="PERMISSION_DENIED",method="ReloadModel"}'


def a_photo() -> Path:
    return sorted(PHOTOS.rglob("*.jpg"))[0]


def reload(channel: grpc.Channel, bundle: Path | str) -> classifier_pb2.ModelInfo:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    return stub.ReloadModel(classifier_pb2.ReloadModelRequest(bundle_path=str(bundle)), timeout=30)


def refused_reload(channel: grpc.Channel, bundle: Path | str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        reload(channel, bundle)
    return caught.value


def serving(channel: grpc.Channel) -> str:
    """The model version a Classify call is answered with."""
    request = classifier_pb2.ClassifyRequest(image=a_photo().read_bytes(), top_k=1)
    return classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=10).model_version


def test_a_plaintext_reload_on_the_public_port_is_refused_and_the_listener_takes_it(
    service: RunningService,
    channel: grpc.Channel,
    admin_channel: grpc.Channel,
    default_bundle: Path,
    default_loaded: Bundle,
    tmp_path: Path,
) -> None:
    offered = copy_bundle(default_bundle, tmp_path / "v2", version="v2")
    error = refused_reload(channel, offered)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.details()
    assert "ReloadModel changes the bin" in details and "presented no client certificate" in details
    assert f"admin listener (127.0.0.1:{service.admin_port})" in details
    assert "admin.allowed_clients" in details
    assert serving(channel) == default_loaded.version
    assert metric(service, REFUSED_RELOADS) == 1.0
    assert metric(service, "smartbin_model_reloads_total") == 0.0  # the bundle was not opened
    # The loopback admin listener serves the same call, and the public port the new model.
    assert reload(admin_channel, offered).model_version == "v2"
    assert serving(channel) == "v2"
    assert metric(service, 'smartbin_model_reloads_total{outcome="success"}') == 1.0
    assert metric(service, 'smartbin_requests_total{code="OK",method="ReloadModel"}') == 1.0


def test_the_admin_listener_is_on_loopback_next_to_the_grpc_port() -> None:
    assert admin.admin_port(ServiceConfig()) == 50052
    assert admin.admin_port(ServiceConfig(port=6000)) == 6001
    assert admin.admin_port(ServiceConfig(port=0)) == 0  # a free one, logged at start
    assert admin.admin_port(ServiceConfig(admin={"port": 7000})) == 7000
    assert admin.admin_port(ServiceConfig(admin={"enabled": False})) is None
    assert admin.admin_address(ServiceConfig(admin={"host": "::1"})) == "[::1]:50052"
    with pytest.raises(ValidationError, match="not a loopback address"):
        ServiceConfig(admin={"host": "0.0.0.0"})
    with pytest.raises(ValueError, match="admin.port must be set"):
        admin.admin_port(ServiceConfig(port=65535))


def test_allowed_clients_need_mutual_tls(default_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="set tls.client_ca"):
        local_config(default_bundle, admin={"allowed_clients": ["operator"]})
    with pytest.raises(ValidationError, match="set tls.client_ca"):
        local_config(
            default_bundle,
            admin={"allowed_clients": ["operator"]},
            tls={"cert": tmp_path / "bin.crt", "key": tmp_path / "bin.key"},
        )


def test_admin_methods_are_methods_of_the_service() -> None:
    service = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    names = {f"/{service.full_name}/{method.name}" for method in service.methods}
    assert admin.ADMIN_METHODS.issubset(names)
    assert "/smartbin.v1.Classifier/ReloadModel" in admin.ADMIN_METHODS


def test_without_the_admin_listener_reloads_need_mutual_tls(
    default_bundle: Path, tmp_path: Path
) -> None:
    running = create_server(local_config(default_bundle, admin={"enabled": False}))
    try:
        assert running.admin_server is None and running.admin_port is None
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            details = refused_reload(channel, "").details()
        assert "admin listener" not in details and "admin.allowed_clients" in details
    finally:
        running.stop(grace=0)


@dataclass
class Operators:
    ca: Authority
    server: Issued
    by_name: Issued  # allowed by its common name
    by_alt_name: Issued  # allowed by a subject alternative name
    other: Issued  # a valid certificate from the same CA, not allowed


@pytest.fixture(scope="module")
def operators(tmp_path_factory: pytest.TempPathFactory) -> Operators:
    folder = tmp_path_factory.mktemp("admin-pki")
    ca = Authority(folder, "fleet-ca")
    return Operators(
        ca,
        ca.issue("bin-0001", server=True),
        ca.issue("operator", server=False),
        ca.issue("ci-runner", server=False, alt_names=("deployer.fleet.example",)),
        ca.issue("kiosk", server=False, alt_names=("kiosk.fleet.example",)),
    )


@pytest.fixture(scope="module")
def mtls_service(
    default_bundle: Path, operators: Operators, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    tls = {
        "cert": operators.server.cert,
        "key": operators.server.key,
        "client_ca": operators.ca.cert_path,
    }
    config = local_config(
        default_bundle,
        tls=tls,
        admin={"allowed_clients": ["operator", "deployer.fleet.example"]},
        reload_dirs=[tmp_path_factory.getbasetemp()],
    )
    running = create_server(config)
    yield running
    running.stop(grace=0)


def channel_as(service: RunningService, operators: Operators, client: Issued) -> grpc.Channel:
    return open_channel(
        f"localhost:{service.port}", ca=operators.ca.cert_path, cert=client.cert, key=client.key
    )


def test_with_mutual_tls_only_allowed_client_certificates_may_reload(
    mtls_service: RunningService,
    operators: Operators,
    default_bundle: Path,
    tmp_path: Path,
) -> None:
    before = metric(mtls_service, REFUSED_RELOADS)
    by_name = copy_bundle(default_bundle, tmp_path / "by-name", version="by-name")
    by_alt_name = copy_bundle(default_bundle, tmp_path / "by-alt-name", version="by-alt-name")
    with channel_as(mtls_service, operators, operators.by_name) as channel:
        assert reload(channel, by_name).model_version == "by-name"
    with channel_as(mtls_service, operators, operators.by_alt_name) as channel:
        assert reload(channel, by_alt_name).model_version == "by-alt-name"
    with channel_as(mtls_service, operators, operators.other) as channel:
        error = refused_reload(channel, by_name)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "client certificate (kiosk, kiosk.fleet.example)" in error.details()
        assert "is not in admin.allowed_clients" in error.details()
        # It may still classify, with the model the operators loaded.
        assert serving(channel) == "by-alt-name"
    assert metric(mtls_service, REFUSED_RELOADS) == before + 1


def test_the_admin_command_reloads_through_the_listener(
    service: RunningService,
    default_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    offered = copy_bundle(default_bundle, tmp_path / "v3", version="v3")
    admin.main(["--target", f"127.0.0.1:{service.admin_port}", "reload", str(offered)])
    assert "serving v3 (" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        admin.main(["--target", f"127.0.0.1:{service.port}", "reload", str(offered)])
    assert "reload refused: PERMISSION_DENIED" in str(refused.value.code)
