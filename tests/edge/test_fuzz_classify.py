"""Whatever reaches Classify gets a clear answer, and the server is unchanged afterwards.

Hypothesis throws random bytes, truncated and corrupted files, every image mode and format the
service accepts (greyscale, CMYK, alpha, 16-bit, float, animated, rotated by EXIF), decompression
bombs, absurd top_k values and malformed request messages at a real ``smartbin-serve`` process.
Every call must end OK or INVALID_ARGUMENT with a reason, never UNKNOWN or INTERNAL; afterwards the
server's memory is where it was, its health is SERVING and it gives the same answers.

``SMARTBIN_FUZZ_EXAMPLES`` sets the examples per test (default 40).
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import PHOTOS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edge_service.config import ServiceConfig
from smartbin.bundle import Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.service import ServiceProcess, spawn_service

EXAMPLES = int(os.environ.get("SMARTBIN_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
# Memory a fuzzed server may gain for good: allocator pools warming up, not a leak.
RSS_GROWTH_LIMIT = 40 * 2**20
# Peak memory above the warmed-up size: the largest image here decodes to a few megabytes, so a
# peak far above that means something allocated by the declared size instead of the data.
PEAK_LIMIT = 300 * 2**20

MODES_BY_FORMAT = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
}
ANIMATED = {"PNG", "WEBP", "GIF", "TIFF"}
EXIF_ORIENTATION = 0x0112
PNG_MAX_SIDE = 2**31 - 1
DEFAULT_MAX_PIXELS = ServiceConfig().max_pixels


class Fuzzed:
    """The server under fuzz, a stub and its labels."""

    def __init__(self, server: ServiceProcess, channel: grpc.Channel, labels: int) -> None:
        self.server = server
        self.channel = channel
        self.stub = classifier_pb2_grpc.ClassifierStub(channel)
        self.labels = labels
        self.process = psutil.Process(server.process.pid)
        self.rss_before = 0
        self.peak_before = 0
        self.reference: list[tuple[str, float]] = []

    def classify(self, image: bytes, top_k: int = 0) -> tuple[grpc.StatusCode, str]:
        try:
            reply = self.stub.Classify(
                classifier_pb2.ClassifyRequest(image=image, top_k=top_k), timeout=30
            )
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        expected = top_k or self.labels
        assert len(reply.predictions) == expected
        if not top_k:
            assert sum(p.score for p in reply.predictions) == pytest.approx(1.0, abs=1e-3)
        return grpc.StatusCode.OK, ""

    def answer_to(self, image: bytes) -> list[tuple[str, float]]:
        reply = self.stub.Classify(classifier_pb2.ClassifyRequest(image=image), timeout=30)
        return [(p.label, round(p.score, 5)) for p in reply.predictions]


def peak_rss(pid: int) -> int:
    """The process's high-water resident memory (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_jpeg() -> bytes:
    return sorted(PHOTOS.rglob("*.jpg"))[0].read_bytes()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def fuzzed(default_bundle: Path, default_loaded: Bundle) -> Iterator[Fuzzed]:
    server = spawn_service(["--bundle", str(default_bundle), "--num-threads", "1"])
    channel = grpc.insecure_channel(server.target)
    target = Fuzzed(server, channel, len(default_loaded.labels))
    try:
        # Warm up every path once so the baseline includes the allocator's first growth.
        good = photo_jpeg()
        target.reference = target.answer_to(good)
        for warm in (b"", b"junk", good[:500], png_claiming(10**5, 10**5)):
            target.classify(warm)
        target.classify(encode(Image.new("RGBA", (400, 400)), "PNG"))
        target.rss_before = target.process.memory_info().rss
        target.peak_before = peak_rss(target.process.pid)
        yield target
    finally:
        channel.close()
        server.stop()


@st.composite
def valid_images(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(MODES_BY_FORMAT)))
    mode = draw(st.sampled_from(MODES_BY_FORMAT[fmt]))
    width, height = draw(st.integers(1, 400)), draw(st.integers(1, 400))
    frames = draw(st.integers(1, 3)) if fmt in ANIMATED else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def frame() -> Image.Image:
        if mode == "I;16":
            return Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
        if mode == "I":
            return Image.fromarray(rng.integers(-(2**31), 2**31, (height, width), dtype=np.int32))
        if mode == "F":
            return Image.fromarray(rng.normal(0, 1e3, (height, width)).astype(np.float32))
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Image.fromarray(rgb).convert(mode)

    images = [frame() for _ in range(frames)]
    options: dict[str, object] = {}
    if frames > 1:
        options.update(save_all=True, append_images=images[1:])
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = draw(st.integers(1, 8))
        options["exif"] = exif
    return encode(images[0], fmt, **options)


@FUZZ
@given(image=valid_images())
def test_every_accepted_format_and_mode_is_classified(fuzzed: Fuzzed, image: bytes) -> None:
    code, details = fuzzed.classify(image)
    assert code == grpc.StatusCode.OK, details


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_invalid_argument_with_a_reason(fuzzed: Fuzzed, data: bytes) -> None:
    code, details = fuzzed.classify(data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in details


@pytest.fixture(scope="module")
def sample_files() -> list[bytes]:
    rng = np.random.default_rng(1)
    pixels = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    return [
        photo_jpeg(),
        encode(pixels, "PNG"),
        encode(pixels.convert("RGBA"), "WEBP"),
        encode(pixels.convert("P"), "GIF"),
        encode(pixels, "JPEG", progressive=True),
    ]


@FUZZ
@given(data=st.data())
def test_truncated_files_get_a_clear_answer(
    fuzzed: Fuzzed, sample_files: list[bytes], data: st.DataObject
) -> None:
    original = data.draw(st.sampled_from(sample_files))
    cut = data.draw(st.integers(0, len(original) - 1))
    code, details = fuzzed.classify(original[:cut])
    assert code in ANSWERS, details
    if code != grpc.StatusCode.OK:
        assert details


@FUZZ
@given(data=st.data())
def test_corrupted_files_get_a_clear_answer(
    fuzzed: Fuzzed, sample_files: list[bytes], data: st.DataObject
) -> None:
    corrupt = bytearray(data.draw(st.sampled_from(sample_files)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(corrupt) - 1), st.integers(0, 255)), max_size=24)
    )
    for position, value in flips:
        corrupt[position] = value
    code, details = fuzzed.classify(bytes(corrupt))
    assert code in ANSWERS, details
    if code != grpc.StatusCode.OK:
        assert details


@st.composite
def sizes_beyond_the_limit(draw: st.DrawFn) -> tuple[int, int]:
    width = draw(st.integers(1, PNG_MAX_SIDE))
    height = draw(st.integers(DEFAULT_MAX_PIXELS // width + 1, PNG_MAX_SIDE))
    return (width, height) if draw(st.booleans()) else (height, width)


@FUZZ
@given(size=sizes_beyond_the_limit())
def test_declared_sizes_beyond_the_pixel_limit_are_refused_unread(
    fuzzed: Fuzzed, size: tuple[int, int]
) -> None:
    code, details = fuzzed.classify(png_claiming(*size))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{size[0]}x{size[1]}" in details and "more than the limit" in details


@FUZZ
@given(top_k=st.integers(0, 2**32 - 1))
def test_any_top_k_gets_a_ranked_answer_or_a_reason(fuzzed: Fuzzed, top_k: int) -> None:
    code, details = fuzzed.classify(photo_jpeg(), top_k)
    if top_k <= fuzzed.labels:
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"top_k is {top_k}" in details


@FUZZ
@given(raw=st.binary(max_size=512))
def test_malformed_request_messages_get_a_clear_answer(fuzzed: Fuzzed, raw: bytes) -> None:
    call = fuzzed.channel.unary_unary("/smartbin.v1.Classifier/Classify")
    try:
        call(raw, timeout=30)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details()
    else:
        raise AssertionError(f"{raw!r} was classified")


def test_a_real_decompression_bomb_is_refused(fuzzed: Fuzzed) -> None:
    bomb = encode(Image.new("L", (8000, 6000)), "PNG", optimize=True)
    assert len(bomb) < 200_000
    code, details = fuzzed.classify(bomb)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "48000000 pixels, more than the limit" in details


def test_an_elongated_image_is_classified_in_bounded_memory(fuzzed: Fuzzed) -> None:
    # 290 bytes, 2 x 20000: resizing its short side to the default bundle's resize_size (365 px)
    # first would make a 365 x 3650000 image; only the centre crop is resampled.
    code, details = fuzzed.classify(encode(Image.new("RGB", (2, 20000), (9, 9, 9)), "PNG"))
    assert code == grpc.StatusCode.OK, details
    assert peak_rss(fuzzed.process.pid) - fuzzed.peak_before < PEAK_LIMIT


def test_after_fuzzing_memory_health_and_answers_are_unchanged(fuzzed: Fuzzed) -> None:
    """Runs last in this file: it judges what the fuzzing above did to the server."""
    time.sleep(0.5)  # let the last calls' buffers go
    rss_after = fuzzed.process.memory_info().rss
    assert rss_after - fuzzed.rss_before < RSS_GROWTH_LIMIT, (
        f"RSS grew from {fuzzed.rss_before / 2**20:.1f} MB to {rss_after / 2**20:.1f} MB"
    )
    assert peak_rss(fuzzed.process.pid) - fuzzed.peak_before < PEAK_LIMIT
    health = health_pb2_grpc.HealthStub(fuzzed.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert fuzzed.answer_to(photo_jpeg()) == fuzzed.reference
    assert fuzzed.server.process.poll() is None
