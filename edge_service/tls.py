"""TLS and mutual TLS credentials for the service's gRPC port, from PEM files (the clients'
side is the contract's: smartbin.channel)."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc

from edge_service.config import TLSConfig
from smartbin.channel import read_pem

logger = logging.getLogger(__name__)


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
