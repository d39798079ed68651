"""TLS and mutual TLS credentials for the gRPC port and its clients, from PEM files."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc

from edge_service.config import TLSConfig

logger = logging.getLogger(__name__)


def read_pem(path: Path, what: str) -> bytes:
    """Read one PEM file, with an error that names the setting it came from.

    Raises:
        ValueError: the file cannot be read or holds no PEM block.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Credentials for the service's port; with ``client_ca`` set, clients must present a
    certificate it signed.

    Raises:
        ValueError: a file is unreadable, or the certificate and key do not form a usable pair.
    """
    cert = read_pem(tls.cert, "tls.cert")
    key = read_pem(tls.key, "tls.key")
    client_ca = read_pem(tls.client_ca, "tls.client_ca") if tls.client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    # gRPC only says "failed to bind" for a bad certificate, the same words as for a taken port;
    # binding a throwaway loopback port first tells the two apart.
    if not _credentials_bind(credentials):
        raise ValueError(
            f"tls.cert {tls.cert} and tls.key {tls.key} are not a valid PEM certificate chain "
            "and its matching private key"
            + (f" (or tls.client_ca {tls.client_ca} is not a valid CA bundle)" if client_ca else "")
        )
    return credentials


def _credentials_bind(credentials: grpc.ServerCredentials) -> bool:
    probe = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        probe.add_secure_port("127.0.0.1:0", credentials)
        return True
    except RuntimeError:
        return False
    finally:
        probe.stop(None)


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a client: ``ca`` checks the server (system roots when None); ``cert`` and
    ``key`` identify the client to a mutual-TLS service.

    Raises:
        ValueError: only one of cert and key was given, or a file is unreadable.
    """
    if (cert is None) != (key is None):
        raise ValueError("give both a client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "CA bundle") if ca else None,
        private_key=read_pem(key, "client key") if key else None,
        certificate_chain=read_pem(cert, "client certificate") if cert else None,
    )
