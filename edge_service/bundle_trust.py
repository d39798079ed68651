"""Which bundles the bin serves: those signed by a key its config trusts, and the one it ships.

``bundle_signing`` in the service config lists the public keys the bin trusts and whether a
signature is required. Every bundle the bin is about to serve passes :meth:`BundleTrust.load`:
the one configured at start, each ``ReloadModel`` and each change of a watched bundle folder.

The bundle shipped inside this package (``edge_service/default_bundle``) carries no signature:
no project key is shipped. The package vouches for it instead, by the digest of its manifest
(which records the model's sha256) pinned below, so a bin that requires signatures still starts
on it out of the box. Whoever can change that digest can change this code too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_service.config import BundleSigningConfig
from smartbin.bundle import Bundle, Manifest, load_bundle, read_manifest_json
from smartbin.signing import (
    SignatureError,
    canonical_manifest,
    load_trusted_keys,
    read_signature,
    verify_bundle,
)

logger = logging.getLogger(__name__)

# smartbin.signing.manifest_digest of edge_service/default_bundle. Replacing the shipped bundle
# means updating this (tests/edge/test_bundle_signing.py says so, with the new value).
SHIPPED_MANIFEST_SHA256 = "ac7d14f9e280f8b001c5e9a4b6b934879df1c4fba4c4dd72b8b3afd8a2c5a379"


class BundleTrust:
    """The bundle_signing policy: trusted public keys by key id, and whether they are required."""

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], required: bool) -> None:
        self.keys = dict(keys)
        self.required = required

    @classmethod
    def from_config(cls, config: BundleSigningConfig) -> BundleTrust:
        """Raises:
        SignatureError: a trusted key file is unreadable or not an Ed25519 public key.
        """
        try:
            keys = load_trusted_keys(config.trusted_keys)
        except SignatureError as err:
            raise SignatureError(f"bundle_signing.trusted_keys: {err}") from err
        trust = cls(keys, config.required)
        if trust.required and not trust.keys:
            logger.warning(
                "bundle_signing.required with no trusted_keys: only the bundle shipped with "
                "smartbin-edge can be served"
            )
        return trust

    def load(self, folder: Path) -> Bundle:
        """Load the bundle at ``folder`` if this policy lets it be served.

        Raises:
            SignatureError: the bundle is unsigned, signed by a key that is not trusted, or its
                signature does not match, where the policy requires a valid one.
            BundleError: the bundle is missing, invalid or corrupt.
        """
        folder = Path(folder)
        vouched = self.vouch(folder)
        bundle = load_bundle(folder)
        if vouched is not None and bundle.manifest != vouched:
            raise SignatureError(
                f"{folder / 'manifest.json'} changed while its signature was being checked: "
                "offer the bundle again once it is completely copied"
            )
        return bundle

    def vouch(self, folder: Path) -> Manifest | None:
        """The manifest this policy vouches for, read once and checked; None when the bundle is
        served without a check (no trusted key says anything about it, and none is required).

        Raises:
            SignatureError: as for :meth:`load`.
            BundleError: the manifest is missing or invalid.
        """
        if not self.keys and not self.required:
            return None
        data, manifest = read_manifest_json(folder)
        if hashlib.sha256(canonical_manifest(data)).hexdigest() == SHIPPED_MANIFEST_SHA256:
            logger.info("bundle %s is the one shipped with smartbin-edge", folder)
            return manifest
        signature = read_signature(folder)
        if signature is not None and (self.required or signature["key_id"] in self.keys):
            # A trusted key's signature must match even where none is required.
            signer, verified = verify_bundle(folder, self.keys)
            logger.info(
                "bundle %s (%s) is signed by trusted key %s", folder, verified.version, signer
            )
            return verified
        if self.required:
            raise SignatureError(
                f"bundle {folder} is not signed (no signature.json), and this bin serves only "
                "bundles signed by a key in bundle_signing.trusted_keys (bundle_signing.required): "
                "sign it with smartbin-sign BUNDLE --signing-key KEY or smartbin-convert "
                "--signing-key KEY"
            )
        logger.warning(
            "bundle %s is %s; served because bundle_signing.required is false",
            folder,
            "unsigned" if signature is None else f"signed by untrusted key {signature['key_id']}",
        )
        return None
