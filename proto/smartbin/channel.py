"""How a client reaches a bin: a plaintext or (mutual) TLS channel to its gRPC port, and the
``--ca/--cert/--key/--server-name`` flags every smartbin client takes."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc


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


def open_channel(
    target: str,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
    options: list[tuple[str, int | str]] | None = None,
) -> grpc.Channel:
    """A plaintext channel, or a TLS one when any of ``ca``, ``cert``, ``key`` is given.

    Args:
        target: service address, host:port.
        ca: PEM CA bundle that signed the service's certificate (system roots when None).
        cert: PEM client certificate, for a service that requires mutual TLS.
        key: PEM private key of ``cert``.
        server_name: name to check the service's certificate against, when it differs from
            the host in ``target``.
        options: gRPC channel options (a larger ``grpc.max_receive_message_length``...).

    Raises:
        ValueError: a certificate file is unreadable, or only one of cert and key was given.
    """
    settings = list(options or [])
    if ca is None and cert is None and key is None:
        return grpc.insecure_channel(target, options=settings)
    if server_name:
        settings.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, channel_credentials(ca, cert, key), options=settings)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ca/--cert/--key/--server-name flags every smartbin client takes."""
    tls = parser.add_argument_group("TLS (plaintext unless one of --ca, --cert, --key is given)")
    tls.add_argument("--ca", type=Path, help="PEM CA bundle that signed the service certificate")
    tls.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    tls.add_argument("--key", type=Path, help="PEM private key of --cert")
    tls.add_argument("--server-name", help="name on the service certificate, if not the host")


def channel_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> grpc.Channel:
    """The channel that ``--target`` and the TLS flags describe; a bad flag is a usage error."""
    try:
        return open_channel(args.target, args.ca, args.cert, args.key, args.server_name)
    except ValueError as err:
        parser.error(str(err))
