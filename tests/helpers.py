"""Helpers every test folder may use; nothing here imports the trainer, converter or torch, so the
edge tests run with them in the edge-only environment (make test-edge)."""

from __future__ import annotations

import ast
import datetime
import io
import ipaddress
import json
import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from edge_service.config import ServiceConfig
from smartbin.bundle import MANIFEST_NAME, Bundle

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# A dozen real TrashNet photos per class, small (tests/data/photos/SOURCE.md).
PHOTOS = DATA / "photos"
# The line a server logs when its loopback admin listener is up; group 1 is its address.
ADMIN_LINE = re.compile(r"admin calls \([^)]*\) on (\S+),")


class HasMetricsPort(Protocol):
    metrics_port: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.02)


def scrape(service: HasMetricsPort) -> str:
    """The service's /metrics page, as Prometheus reads it."""
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def metric(service: HasMetricsPort, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with ``line_start``; 0 when
    there is none yet."""
    for line in scrape(service).splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def slow_png(width: int = 6000, height: int = 5000) -> bytes:
    """A small file that is slow to classify: a 30-megapixel gradient PNG (about 400 kB)."""
    y, x = np.indices((height, width), dtype=np.uint32)
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def copy_bundle(source: Path, folder: Path, **changes: Any) -> Path:
    """A copy of the bundle at ``source`` in ``folder``, its manifest's top-level keys replaced
    by ``changes`` (relabelled, re-versioned...). The model file is copied unchanged."""
    shutil.copytree(source, folder)
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest.update(changes)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return folder


def open_float_twin(path: Path, bundle: Bundle) -> tuple[Interpreter, dict, dict]:
    """The float32 twin of ``bundle`` at ``path``, checked to take float32 pixels of the
    bundle's input size and give one float32 score per label; with its input and output."""
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    size = bundle.preprocessing.input_size
    assert inp["dtype"] == np.float32 and tuple(inp["shape"]) == (1, size, size, 3)
    assert out["dtype"] == np.float32 and out["shape"][-1] == len(bundle.labels)
    return interpreter, inp, out


def local_config(bundle: Path, **overrides: object) -> ServiceConfig:
    """A config serving ``bundle`` on free loopback ports with one thread, plus ``overrides``."""
    settings = {
        "bundle": bundle,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "num_threads": 1,
    }
    settings.update(overrides)
    return ServiceConfig(**settings)


def modules_imported_by(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports, wherever the import statement is
    (relative imports left out)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# Certificates for the TLS and admin tests: a CA in a folder, and the server and client
# certificates it signs.


@dataclass
class Issued:
    cert: Path
    key: Path


def certificate_for(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


class Authority:
    """A certificate authority in a folder: it signs server and client certificates."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            certificate_for(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = folder / f"{name}.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, server: bool, alt_names: tuple[str, ...] = ()) -> Issued:
        """A certificate with common name ``name``: a server's names localhost and 127.0.0.1,
        a client's the DNS names ``alt_names`` (subject alternative names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            certificate_for(subject, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(alt) for alt in alt_names]
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.folder / f"{name}.crt", self.folder / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued
