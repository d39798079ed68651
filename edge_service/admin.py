"""Who may change the bin: the admin calls, the gate on the public port, the admin listener.

Calls that change what the bin does (:data:`ADMIN_METHODS`: ``ReloadModel``,
``RollbackModel``...) need an operator. On the public gRPC port :class:`AdminGate` lets one
through only when the caller presented a client certificate that the port verified against
``tls.client_ca`` and whose name (subject CN or a subject alternative name) is listed in
``admin.allowed_clients``; every other caller gets PERMISSION_DENIED, counted in
``smartbin_requests_total{code="PERMISSION_DENIED"}``.
The admin listener, a second gRPC server bound to loopback only (``admin.host``/``admin.port``),
serves the same service to operators on the bin itself, without the gate. ``Classify`` and the
other calls that only read stay as open as the port is.

``python -m edge_service.admin reload [BUNDLE]`` asks a bin to reload, and
``python -m edge_service.admin rollback`` to swap back to its previous bundle, by default
through the admin listener of this machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from edge_service.config import ServiceConfig
from edge_service.const import DEFAULT_GRPC_PORT
from edge_service.guard import CallGuard
from edge_service.metrics import ServiceMetrics
from smartbin.channel import add_tls_arguments, channel_from_args
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

_SERVICE = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
# The Classifier methods that change the bin, as gRPC names them. A method added later that
# changes the bin (its model, its settings, its files) belongs here.
# ExportLabelled changes nothing, but the photos it hands out are the site's.
ADMIN_METHODS = frozenset(
    f"/{_SERVICE}/{name}" for name in ("ReloadModel", "RollbackModel", "ExportLabelled")
)
# What the admin listener may take: one call at a time is what operators need.
ADMIN_WORKERS = 2
# The auth context properties that name a verified peer certificate.
_NAME_PROPERTIES = (
    "x509_common_name",
    "x509_subject_alternative_name",
    "peer_dns",
    "peer_uri",
    "peer_email",
    "peer_ip",
)


def admin_port(config: ServiceConfig) -> int | None:
    """The admin listener's port: ``admin.port``, else the gRPC port + 1, else (gRPC port 0) a
    free one; None when the listener is off.

    Raises:
        ValueError: the gRPC port is 65535 and no admin.port is set.
    """
    if not config.admin.enabled:
        return None
    if config.admin.port is not None:
        return config.admin.port
    if config.port == 0:
        return 0
    if config.port == 65535:
        raise ValueError("the gRPC port is 65535, so admin.port must be set: the next is none")
    return config.port + 1


def admin_address(config: ServiceConfig, port: int | None = None) -> str:
    """host:port of the admin listener (``port``: the one it got, when it was 0)."""
    host = config.admin.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return f"{host}:{port if port is not None else admin_port(config)}"


def client_names(context: grpc.ServicerContext) -> list[str]:
    """The names on the caller's certificate, as the port verified it; [] without one."""
    auth = context.auth_context()
    names: list[str] = []
    for prop in _NAME_PROPERTIES:
        for value in auth.get(prop, []):
            name = bytes(value).decode("utf-8", "replace")
            if name not in names:
                names.append(name)
    return names


class AdminGate(grpc.ServerInterceptor):
    """On the public port: admin calls only from a client certificate named in
    ``admin.allowed_clients``; PERMISSION_DENIED, counted, for everyone else."""

    def __init__(
        self, config: ServiceConfig, metrics: ServiceMetrics, listener: str | None
    ) -> None:
        """``listener``: the admin listener's host:port, named in refusals; None: there is
        none."""
        # Names count only on certificates the port checked against its CA (mutual TLS).
        verified = config.tls is not None and config.tls.client_ca is not None
        self.allowed = frozenset(config.admin.allowed_clients if verified else ())
        self.metrics = metrics
        self.listener = listener

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in ADMIN_METHODS:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                self.check(method, context)
                return behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self.check(method, context)
                yield from stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"admin method {method} takes a stream of requests: no gate for it")

    def check(self, method: str, context: grpc.ServicerContext) -> None:
        """Return when the caller may make the admin call ``method``; abort it otherwise.

        Raises:
            Exception: gRPC's abort, with PERMISSION_DENIED and what to do instead.
        """
        names = client_names(context)
        allowed = [name for name in names if name in self.allowed]
        if allowed:
            logger.info("admin call %s by client %s (%s)", method, allowed[0], context.peer())
            return
        self.metrics.requests.labels(method, grpc.StatusCode.PERMISSION_DENIED.name).inc()
        logger.warning(
            "admin call %s refused on the public port: client %s (%s)",
            method,
            ", ".join(names) or "without a certificate",
            context.peer(),
        )
        where = (
            f"on the bin itself through the admin listener ({self.listener}), or "
            if self.listener
            else ""
        )
        who = (
            f"the client certificate ({', '.join(names)}) is not in admin.allowed_clients"
            if names
            else "the caller presented no client certificate"
        )
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} changes the bin and needs an operator, and {who}: call it {where}over "
            "mutual TLS with a client certificate named in the bin's admin.allowed_clients",
        )


def start_admin_listener(
    config: ServiceConfig, metrics: ServiceMetrics, servicer: classifier_pb2_grpc.ClassifierServicer
) -> tuple[grpc.Server, int] | None:
    """The loopback admin listener serving ``servicer`` without the gate, bound (not started);
    None when ``admin.enabled`` is off.

    Raises:
        OSError: its port is taken.
        ValueError: no admin port can be worked out (see :func:`admin_port`).
    """
    port = admin_port(config)
    if port is None:
        return None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=ADMIN_WORKERS, thread_name_prefix="admin"),
        interceptors=[CallGuard(metrics)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=ADMIN_WORKERS * 2,
    )
    classifier_pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
    reflection.enable_server_reflection((_SERVICE, reflection.SERVICE_NAME), server)
    address = admin_address(config, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        server.stop(None)
        raise OSError(
            f"cannot bind admin port {address}: {err} (set admin.port, or admin.enabled: false)"
        ) from err
    return server, bound


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m edge_service.admin",
        description="Admin calls to a bin: by default through the admin listener of this machine.",
    )
    parser.add_argument(
        "--target",
        default=f"127.0.0.1:{DEFAULT_GRPC_PORT + 1}",
        help="the bin's admin listener, or its public port with mutual TLS (host:port)",
    )
    add_tls_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    reload = commands.add_parser("reload", help="load a bundle folder on the bin and serve it")
    reload.add_argument(
        "bundle",
        nargs="?",
        default="",
        help="bundle folder on the bin (a name is taken from the folder holding the served "
        "bundle); empty: the configured one again",
    )
    commands.add_parser(
        "rollback", help="serve the bundle served before the last swap again (kept on the bin)"
    )
    args = parser.parse_args(argv)
    with channel_from_args(parser, args) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        try:
            if args.command == "rollback":
                info = stub.RollbackModel(classifier_pb2.RollbackModelRequest(), timeout=120)
            else:
                info = stub.ReloadModel(
                    classifier_pb2.ReloadModelRequest(bundle_path=args.bundle), timeout=120
                )
        except grpc.RpcError as err:
            sys.exit(f"{args.command} refused: {err.code().name}: {err.details()}")
    labels, sha = len(info.labels), info.model_sha256[:12]
    before = f", previous {info.previous_model_version}" if info.previous_model_version else ""
    print(f"serving {info.model_version} ({labels} labels, sha256 {sha}{before})")


if __name__ == "__main__":
    main()
