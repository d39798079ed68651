"""Signed bundles: an Ed25519 signature over the manifest, made where bundles are built and
checked on the bin.

The manifest names the model file and its sha256, and a bundle loads only when the model file
matches that digest (:func:`smartbin.bundle.load_bundle`). A signature over the manifest therefore
covers the labels, the preprocessing, the version and the model's bytes: a swapped label list or a
replaced model whose digest was written into the manifest both fail to verify.

``signature.json`` beside ``manifest.json`` holds the signing key's id and the signature over
:func:`canonical_manifest` (the manifest as parsed, with sorted keys and no whitespace, after a
fixed prefix), so re-indenting the file does not break it and nothing else does either. Keys are
PEM files: ``smartbin-keygen --out DIR`` writes a pair, the private key stays where bundles are
built (``smartbin-convert --signing-key``, ``smartbin-sign``), the public key goes to the bins.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from smartbin.bundle import (
    SIGNATURE_NAME,
    BundleError,
    Manifest,
    load_bundle,
    read_manifest_json,
)

__all__ = [
    "SIGNATURE_NAME",
    "SignatureError",
    "canonical_manifest",
    "generate_key_pair",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "load_trusted_keys",
    "manifest_digest",
    "read_signature",
    "sign_bundle",
    "verify_bundle",
]

SIGNATURE_FORMAT = 1
ALGORITHM = "Ed25519"
# What is signed starts with this, so a signature made for anything else never passes as one.
_DOMAIN = b"smartbin bundle manifest v1\n"


class SignatureError(BundleError):
    """A bundle is unsigned, signed by a key that is not trusted, or its signature does not
    match its manifest; or a key file is unusable."""


def canonical_manifest(data: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest's JSON object with sorted keys, no whitespace
    and UTF-8 text, after a fixed prefix."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _DOMAIN + text.encode("utf-8")


def manifest_digest(folder: Path) -> str:
    """The sha256 of the canonical form of ``folder``'s manifest: one value that stands for the
    manifest and, through the model digest it records, the model.

    Raises:
        BundleError: the manifest is missing or invalid.
    """
    data, _ = read_manifest_json(Path(folder))
    return hashlib.sha256(canonical_manifest(data)).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read {what} {path}: {err.strerror or err}") from err


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file at ``path`` (``smartbin-keygen``'s ``.key``).

    Raises:
        SignatureError: the file is unreadable or holds no unencrypted Ed25519 private key.
    """
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SignatureError(
            f"signing key {path} is not an unencrypted PEM private key: {err}"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"signing key {path} is a {type(key).__name__}, not an Ed25519 key: "
            "make one with smartbin-keygen"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM file at ``path`` (``smartbin-keygen``'s ``.pub``).

    Raises:
        SignatureError: the file is unreadable or holds no Ed25519 public key.
    """
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SignatureError(f"public key {path} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"public key {path} is a {type(key).__name__}, not an Ed25519 key: "
            "use the .pub file smartbin-keygen wrote"
        )
    return key


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """The public keys in ``paths`` by key id.

    Raises:
        SignatureError: a file is unreadable or holds no Ed25519 public key.
    """
    keys = (load_public_key(Path(path)) for path in paths)
    return {key_id(key): key for key in keys}


def generate_key_pair(folder: Path, name: str = "bundle-signing") -> tuple[Path, Path]:
    """Write a new key pair into ``folder``: ``NAME.key`` (private, readable by its owner only)
    and ``NAME.pub`` (public). Returns their paths.

    Raises:
        FileExistsError: either file exists already (a key is never overwritten).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: a key is never overwritten; choose another name")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def sign_bundle(folder: Path, signing_key: Ed25519PrivateKey | Path) -> Path:
    """Sign ``folder``'s manifest (checked first) and write ``signature.json`` beside it.

    The model file is checked against the manifest before signing, so a signature never vouches
    for a model the manifest does not describe.

    Raises:
        BundleError: the bundle is invalid, or (SignatureError) the key file is unusable.
    """
    folder = Path(folder)
    key = signing_key
    if not isinstance(key, Ed25519PrivateKey):
        key = load_signing_key(key)
    data, _ = read_manifest_json(folder)
    load_bundle(folder)  # the model file must match the manifest before it is vouched for
    payload = canonical_manifest(data)
    signature = {
        "format_version": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "manifest_sha256": hashlib.sha256(payload).hexdigest(),
        "signature": base64.b64encode(key.sign(payload)).decode("ascii"),
    }
    path = folder / SIGNATURE_NAME
    staging = folder / f".{SIGNATURE_NAME}.tmp"
    staging.write_text(json.dumps(signature, indent=2) + "\n")
    staging.replace(path)
    return path


def read_signature(folder: Path) -> dict[str, Any] | None:
    """``folder``'s signature.json, checked for shape; None when the bundle is unsigned.

    Raises:
        SignatureError: the file is unreadable or not a signature this code reads.
    """
    path = Path(folder) / SIGNATURE_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise SignatureError(f"{path} cannot be read: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SignatureError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise SignatureError(f"{path} is not a signature: a JSON object is expected")
    if data.get("format_version") != SIGNATURE_FORMAT or data.get("algorithm") != ALGORITHM:
        raise SignatureError(
            f"{path} is not a format {SIGNATURE_FORMAT} {ALGORITHM} signature "
            f"(format_version {data.get('format_version')!r}, algorithm "
            f"{data.get('algorithm')!r})"
        )
    if not isinstance(data.get("key_id"), str) or not isinstance(data.get("signature"), str):
        raise SignatureError(f"{path} lacks its key_id or signature")
    return data


def verify_bundle(folder: Path, trusted: Mapping[str, Ed25519PublicKey]) -> tuple[str, Manifest]:
    """Check that ``folder``'s manifest is signed by one of the ``trusted`` keys (by key id).

    Returns the signing key's id and the manifest validated from the very bytes that were
    verified (compare it with the manifest a later load reads, so a file swapped in between is
    caught). The model file is not read here: loading the bundle checks it against the manifest.

    Raises:
        SignatureError: the bundle is unsigned, its key is not trusted, or the signature does
            not match the manifest (it changed after signing).
        BundleError: the manifest is missing or invalid.
    """
    folder = Path(folder)
    signature = read_signature(folder)
    if signature is None:
        raise SignatureError(
            f"bundle {folder} is not signed (no {SIGNATURE_NAME}): sign it with "
            "smartbin-sign BUNDLE --signing-key KEY (or smartbin-convert --signing-key KEY)"
        )
    key = trusted.get(signature["key_id"])
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise SignatureError(
            f"bundle {folder} is signed by key {signature['key_id']}, which is not trusted here "
            f"(trusted keys: {known}): add its public key to bundle_signing.trusted_keys, or "
            "sign the bundle with a trusted key"
        )
    data, manifest = read_manifest_json(folder)
    try:
        signed = base64.b64decode(signature["signature"], validate=True)
        key.verify(signed, canonical_manifest(data))
    except (InvalidSignature, binascii.Error) as err:
        raise SignatureError(
            f"bundle {folder}: {SIGNATURE_NAME} does not match {folder / 'manifest.json'}: "
            "the manifest (or the model digest it records) changed after signing; "
            "do not serve it, rebuild and sign it again"
        ) from err
    return signature["key_id"], manifest


def keygen_main(argv: list[str] | None = None) -> None:
    """``smartbin-keygen``: write an Ed25519 key pair for signing bundles."""
    parser = argparse.ArgumentParser(
        description="Write an Ed25519 key pair for signing model bundles: NAME.key (private: "
        "keep it where bundles are built) and NAME.pub (public: list it in each bin's "
        "bundle_signing.trusted_keys)."
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the keys to")
    parser.add_argument("--name", default="bundle-signing", help="file name of the pair")
    args = parser.parse_args(argv)
    try:
        private_path, public_path = generate_key_pair(args.out, args.name)
    except (FileExistsError, OSError) as err:
        sys.exit(f"smartbin-keygen: {err}")
    public = load_public_key(public_path)
    print(f"private key: {private_path} (keep it secret: it signs bundles every bin will load)")
    print(f"public key:  {public_path} (key id {key_id(public)}: give it to the bins)")


def sign_main(argv: list[str] | None = None) -> None:
    """``smartbin-sign``: sign a bundle folder, or check its signature."""
    parser = argparse.ArgumentParser(
        description="Sign a model bundle (writes signature.json beside its manifest), or check "
        "that it is signed by one of the given public keys."
    )
    parser.add_argument("bundle", type=Path, help="bundle folder")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--signing-key", type=Path, help="private key (smartbin-keygen's .key)")
    action.add_argument(
        "--verify",
        type=Path,
        nargs="+",
        metavar="PUBLIC_KEY",
        help="check the signature against these public keys instead",
    )
    args = parser.parse_args(argv)
    try:
        if args.signing_key:
            path = sign_bundle(args.bundle, args.signing_key)
            print(f"signed: {path}")
        else:
            signer, manifest = verify_bundle(args.bundle, load_trusted_keys(args.verify))
            print(f"bundle {manifest.version} is signed by key {signer}")
    except BundleError as err:
        sys.exit(f"smartbin-sign: {err}")
