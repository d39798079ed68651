"""RollbackModel: one call swaps back to the bundle served before, kept on disk, and the bin
reports which version it serves and which it would go back to."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from helpers import PHOTOS, copy_bundle, local_config
from pydantic import ValidationError

from edge_service import admin
from edge_service.server import RunningService, create_server
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc


def info(channel: grpc.Channel) -> classifier_pb2.ModelInfo:
    return classifier_pb2_grpc.ClassifierStub(channel).GetModelInfo(
        classifier_pb2.GetModelInfoRequest(), timeout=10
    )


def reload(channel: grpc.Channel, folder: Path) -> classifier_pb2.ModelInfo:
    return classifier_pb2_grpc.ClassifierStub(channel).ReloadModel(
        classifier_pb2.ReloadModelRequest(bundle_path=str(folder)), timeout=60
    )


def rollback(channel: grpc.Channel) -> classifier_pb2.ModelInfo:
    return classifier_pb2_grpc.ClassifierStub(channel).RollbackModel(
        classifier_pb2.RollbackModelRequest(), timeout=60
    )


def test_rollback_serves_the_previous_bundle_and_a_second_one_swaps_forward(
    default_bundle: Path, tmp_path: Path, channel: grpc.Channel, admin_channel: grpc.Channel
) -> None:
    shipped = info(channel).model_version
    assert info(channel).previous_model_version == ""
    copy_bundle(default_bundle, tmp_path / "v2", version="site-v2")
    reload(admin_channel, tmp_path / "v2")
    assert (info(channel).model_version, info(channel).previous_model_version) == (
        "site-v2",
        shipped,
    )

    back = rollback(admin_channel)

    assert (back.model_version, back.previous_model_version) == (shipped, "site-v2")
    photo = next(PHOTOS.rglob("*.jpg")).read_bytes()
    answer = classifier_pb2_grpc.ClassifierStub(channel).Classify(
        classifier_pb2.ClassifyRequest(image=photo), timeout=30
    )
    assert answer.model_version == shipped
    assert rollback(admin_channel).model_version == "site-v2"


def test_rollback_with_nothing_before_is_refused_and_the_model_keeps_serving(
    channel: grpc.Channel, admin_channel: grpc.Channel
) -> None:
    shipped = info(channel).model_version
    with pytest.raises(grpc.RpcError) as refused:
        rollback(admin_channel)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing to roll back to" in refused.value.details()
    assert info(channel).model_version == shipped


def test_rollback_refuses_a_previous_folder_that_changed_since(
    default_bundle: Path, tmp_path: Path, channel: grpc.Channel, admin_channel: grpc.Channel
) -> None:
    copy_bundle(default_bundle, tmp_path / "v2", version="site-v2")
    copy_bundle(default_bundle, tmp_path / "v3", version="site-v3")
    reload(admin_channel, tmp_path / "v2")
    reload(admin_channel, tmp_path / "v3")
    manifest = tmp_path / "v2" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": "other"}))

    with pytest.raises(grpc.RpcError) as refused:
        rollback(admin_channel)

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "now holds other" in refused.value.details()
    assert info(channel).model_version == "site-v3"


def test_rollback_is_an_admin_call(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        rollback(channel)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_admin_command_rolls_back(
    default_bundle: Path,
    tmp_path: Path,
    service: RunningService,
    admin_channel: grpc.Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shipped = info(admin_channel).model_version
    copy_bundle(default_bundle, tmp_path / "v2", version="site-v2")
    reload(admin_channel, tmp_path / "v2")

    admin.main(["--target", f"127.0.0.1:{service.admin_port}", "rollback"])

    printed = capsys.readouterr().out
    assert f"serving {shipped} " in printed and "previous site-v2" in printed
    assert info(admin_channel).previous_model_version == "site-v2"


def fleet(folder: Path, **changes: object) -> dict[str, object]:
    return {
        "store_url": "http://127.0.0.1:9/fleet/",
        "bin_id": "bin-1",
        "bundles_dir": str(folder),
        **changes,
    }


def test_a_fleet_section_says_what_to_fix(default_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="must be an http:// or https:// address"):
        local_config(default_bundle, fleet=fleet(tmp_path, store_url="s3://bucket/fleet"))
    with pytest.raises(ValidationError, match="bin id '../bin': use 1 to 64 letters"):
        local_config(default_bundle, fleet=fleet(tmp_path, bin_id="../bin"))


def test_a_bundles_dir_the_service_cannot_write_stops_it_with_its_name(
    default_bundle: Path, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    config = local_config(default_bundle, fleet=fleet(tmp_path / "a-file" / "bundles"))
    with pytest.raises(ValueError, match="fleet.bundles_dir .* is not a folder this service can"):
        create_server(config)
