"""Signed bundles: the contract signs and verifies (smartbin.signing), and a bin configured with
bundle_signing serves only bundles signed by a key it trusts, besides the one it ships.

Bundles here are copies of the shipped default, signed with keys made for the test by the
contract's own functions (the converter, which also signs, is not installed in the edge tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from helpers import PHOTOS, copy_bundle, local_config, metric, wait_for

from edge_service.bundle_trust import SHIPPED_MANIFEST_SHA256
from edge_service.server import RunningService, create_server
from smartbin.bundle import Bundle, BundleError, load_bundle, write_bundle
from smartbin.signing import (
    SIGNATURE_NAME,
    SignatureError,
    generate_key_pair,
    keygen_main,
    load_trusted_keys,
    manifest_digest,
    sign_bundle,
    sign_main,
    verify_bundle,
)
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

UNTRUSTED = 'smartbin_model_reloads_total{outcome="untrusted"}'


@dataclass
class Keys:
    private: Path
    public: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(*generate_key_pair(tmp_path_factory.mktemp("keys")))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(*generate_key_pair(tmp_path_factory.mktemp("other-keys"), "someone-else"))


def signed_copy(default: Path, folder: Path, key: Path, **changes: object) -> Path:
    bundle = copy_bundle(default, folder, **changes)
    sign_bundle(bundle, key)
    return bundle


def swap_two_labels(bundle: Path) -> None:
    """What an attacker would do to turn "plastic" answers into "trash": the labels' order."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    labels = manifest["labels"]
    labels[0], labels[1] = labels[1], labels[0]
    path.write_text(json.dumps(manifest, indent=2))


def tamper_model_and_rehash(bundle: Path) -> None:
    """A changed model whose new sha256 is written into the manifest: load_bundle alone would
    take it."""
    model = bytearray((bundle / "model.tflite").read_bytes())
    model[len(model) // 2] ^= 0xFF
    (bundle / "model.tflite").write_bytes(bytes(model))
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["sha256"] = hashlib.sha256(model).hexdigest()
    path.write_text(json.dumps(manifest, indent=2))


def test_the_pinned_digest_is_the_shipped_bundle(default_bundle: Path) -> None:
    digest = manifest_digest(default_bundle)
    assert digest == SHIPPED_MANIFEST_SHA256, (
        "edge_service/default_bundle changed: set SHIPPED_MANIFEST_SHA256 in "
        f"edge_service/bundle_trust.py to {digest}"
    )


def test_a_signature_covers_the_manifest_and_through_it_the_model(
    default_bundle: Path, keys: Keys, other_keys: Keys, tmp_path: Path
) -> None:
    trusted = load_trusted_keys([keys.public])
    bundle = signed_copy(default_bundle, tmp_path / "signed", keys.private, version="signed")
    signer, manifest = verify_bundle(bundle, trusted)
    assert [signer] == list(trusted) and manifest.version == "signed"
    # Re-indenting the manifest changes no content: still valid.
    path = bundle / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4, sort_keys=True))
    assert verify_bundle(bundle, trusted)[0] == signer
    for damage in (swap_two_labels, tamper_model_and_rehash):
        damaged = copy_bundle(bundle, tmp_path / damage.__name__)
        damage(damaged)
        load_bundle(damaged)  # a consistent bundle, for all load_bundle can tell
        with pytest.raises(SignatureError, match="does not match .* changed after signing"):
            verify_bundle(damaged, trusted)
    with pytest.raises(SignatureError, match="not trusted here"):
        verify_bundle(bundle, load_trusted_keys([other_keys.public]))
    unsigned = copy_bundle(default_bundle, tmp_path / "unsigned")
    with pytest.raises(SignatureError, match="is not signed"):
        verify_bundle(unsigned, trusted)
    signature = json.loads((bundle / SIGNATURE_NAME).read_text())
    signature["signature"] = "not base64!"
    (bundle / SIGNATURE_NAME).write_text(json.dumps(signature))
    with pytest.raises(SignatureError, match="does not match"):
        verify_bundle(bundle, trusted)


def test_keys_are_checked_and_never_overwritten(keys: Keys, tmp_path: Path) -> None:
    assert keys.private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError, match="never overwritten"):
        generate_key_pair(keys.private.parent)
    with pytest.raises(SignatureError, match="not an Ed25519 key|not a PEM public key"):
        load_trusted_keys([keys.private])
    with pytest.raises(SignatureError, match="cannot read public key"):
        load_trusted_keys([tmp_path / "missing.pub"])
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        sign_bundle(tmp_path, keys.public)


def test_rewriting_a_bundle_drops_its_stale_signature(
    default_bundle: Path, default_loaded: Bundle, keys: Keys, tmp_path: Path
) -> None:
    bundle = signed_copy(default_bundle, tmp_path / "b", keys.private)
    assert (bundle / SIGNATURE_NAME).exists()
    write_bundle(
        bundle,
        (bundle / "model.tflite").read_bytes(),
        list(default_loaded.labels),
        default_loaded.preprocessing,
        "rewritten",
        "int8",
        default_loaded.architecture,
    )
    assert not (bundle / SIGNATURE_NAME).exists()


def test_the_keygen_and_sign_commands(
    default_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen_main(["--out", str(tmp_path / "k")])
    assert "key id" in capsys.readouterr().out
    bundle = copy_bundle(default_bundle, tmp_path / "b", version="by-cli")
    key, public = tmp_path / "k" / "bundle-signing.key", tmp_path / "k" / "bundle-signing.pub"
    sign_main([str(bundle), "--signing-key", str(key)])
    sign_main([str(bundle), "--verify", str(public)])
    assert "bundle by-cli is signed by key" in capsys.readouterr().out
    swap_two_labels(bundle)
    with pytest.raises(SystemExit) as refused:
        sign_main([str(bundle), "--verify", str(public)])
    assert "does not match" in str(refused.value.code)


@pytest.fixture(scope="module")
def signed_only(
    default_bundle: Path, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """A bin that requires signatures by ``keys``, started on the (unsigned) shipped bundle."""
    config = local_config(
        default_bundle,
        bundle_signing={"required": True, "trusted_keys": [keys.public]},
        reload_dirs=[tmp_path_factory.getbasetemp()],
    )
    running = create_server(config)
    yield running
    running.stop(grace=0)


def reload(service: RunningService, bundle: Path) -> classifier_pb2.ModelInfo:
    with grpc.insecure_channel(f"127.0.0.1:{service.admin_port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        request = classifier_pb2.ReloadModelRequest(bundle_path=str(bundle))
        return stub.ReloadModel(request, timeout=30)


def serving(service: RunningService) -> str:
    photo = sorted(PHOTOS.rglob("*.jpg"))[0].read_bytes()
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        request = classifier_pb2.ClassifyRequest(image=photo, top_k=1)
        return stub.Classify(request, timeout=10).model_version


def test_a_bin_that_requires_signatures_refuses_tampered_and_unsigned_bundles(
    signed_only: RunningService,
    default_bundle: Path,
    keys: Keys,
    other_keys: Keys,
    tmp_path: Path,
) -> None:
    good = signed_copy(default_bundle, tmp_path / "good", keys.private, version="signed-v2")
    assert reload(signed_only, good).model_version == "signed-v2"
    assert serving(signed_only) == "signed-v2"
    refused_before = metric(signed_only, UNTRUSTED)
    swapped = copy_bundle(good, tmp_path / "swapped")
    swap_two_labels(swapped)
    rehashed = copy_bundle(good, tmp_path / "rehashed")
    tamper_model_and_rehash(rehashed)
    unsigned = copy_bundle(default_bundle, tmp_path / "unsigned", version="unsigned")
    foreign = signed_copy(default_bundle, tmp_path / "foreign", other_keys.private, version="x")
    offers = [
        (swapped, "signature.json does not match"),
        (rehashed, "signature.json does not match"),
        (unsigned, "is not signed (no signature.json)"),
        (foreign, "which is not trusted here"),
    ]
    for offered, reason in offers:
        with pytest.raises(grpc.RpcError) as caught:
            reload(signed_only, offered)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, offered
        assert reason in caught.value.details()
        assert "model signed-v2 keeps serving" in caught.value.details()
        assert serving(signed_only) == "signed-v2"
    assert metric(signed_only, UNTRUSTED) == refused_before + len(offers)
    # The shipped bundle is trusted by its pinned digest, unsigned as it is.
    assert reload(signed_only, default_bundle).model_version == load_bundle(default_bundle).version


def test_a_bin_that_requires_signatures_will_not_start_on_an_unsigned_bundle(
    default_bundle: Path, keys: Keys, tmp_path: Path
) -> None:
    unsigned = copy_bundle(default_bundle, tmp_path / "unsigned", version="unsigned")
    signing = {"required": True, "trusted_keys": [keys.public]}
    with pytest.raises(BundleError, match="is not signed"):
        create_server(local_config(unsigned, bundle_signing=signing))
    config = tmp_path / "bin.yaml"
    config.write_text(json.dumps({"bundle": str(unsigned), "bundle_signing": {"required": True}}))
    checked = subprocess.run(
        [sys.executable, "-m", "edge_service.server", "--config", str(config), "--validate-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1
    assert "is not signed" in checked.stderr
    signing = {"required": True, "trusted_keys": [keys.private]}
    with pytest.raises(SignatureError, match="not an Ed25519 key|not a PEM public key"):
        create_server(local_config(default_bundle, bundle_signing=signing))


def test_without_required_a_trusted_key_still_catches_tampering(
    default_bundle: Path,
    keys: Keys,
    other_keys: Keys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The rollout step before ``required``: signatures by trusted keys are checked, unsigned
    bundles are served with a warning."""
    tampered = signed_copy(default_bundle, tmp_path / "tampered", keys.private, version="t")
    swap_two_labels(tampered)
    unsigned = copy_bundle(default_bundle, tmp_path / "unsigned", version="unsigned")
    foreign = signed_copy(default_bundle, tmp_path / "foreign", other_keys.private, version="f")
    folder = copy_bundle(default_bundle, tmp_path / "watched", version="watched")
    config = local_config(
        folder,
        bundle_signing={"trusted_keys": [keys.public]},
        reload_dirs=[tmp_path],
        watch_bundle_seconds=0.05,
    )
    running = create_server(config)
    try:
        with caplog.at_level(logging.WARNING, "edge_service.bundle_trust"):
            assert reload(running, unsigned).model_version == "unsigned"
            assert reload(running, foreign).model_version == "f"
        assert "is unsigned; served because bundle_signing.required is false" in caplog.text
        assert "signed by untrusted key" in caplog.text
        with pytest.raises(grpc.RpcError) as caught:
            reload(running, tampered)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert serving(running) == "f"
        # A tampered signed bundle copied into the watched folder, file by file: refused (and
        # counted) however much of it the watcher saw.
        for name in (SIGNATURE_NAME, "manifest.json"):
            shutil.copy(tampered / name, folder / name)
        wait_for(lambda: metric(running, UNTRUSTED) >= 2.0)
        assert serving(running) == "f"
    finally:
        running.stop(grace=0)
