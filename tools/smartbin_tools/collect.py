"""``smartbin-collect``: the photos filed on a bin's review page, as a training folder.

``smartbin-collect --target BIN:PORT --out FOLDER`` streams them over the bin's
``ExportLabelled`` call (an admin call: the bin's loopback admin listener, or its public port
with an operator's client certificate) and writes ``FOLDER/<label>/<bin>_<photo id>.jpg``, each
photo beside a ``.json`` sidecar that says when and on which bin it was taken, which model
answered and when it was filed. The folder loads as it is in ``smartbin-train``, which reads
one sub-folder per category, skips files that are not images and folders whose names start
with a dot: photos filed as "not an item" go to ``.not-an-item/``.

Every file is written to a temporary name and renamed into place, the photo before its
sidecar, and a photo counts as collected only when its sidecar names its size and sha256. A run
cut off (the bin restarting, the network going) leaves no half file that counts; the next run
removes what is incomplete, tells the bin which photos it already has, and fetches the rest.
Collecting several bins into one folder is safe: file names start with the bin's id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from smartbin.channel import add_tls_arguments, open_channel
from smartbin.files import write_atomically
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

# Names the bin sends that become paths here: checked, so a bin cannot write outside FOLDER.
_LABEL = re.compile(r"^\.?[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Photos of several megabytes (a phone's upload) must fit in one message.
MAX_MESSAGE_BYTES = 64 * 2**20


class CollectError(Exception):
    """The bin sent something that cannot be written safely; the message says what."""


@dataclass
class Summary:
    """What one run did, by label."""

    written: Counter[str] = field(default_factory=Counter)
    already_there: int = 0
    removed_incomplete: int = 0
    refused: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| label | photos written |", "|---|---:|"]
        lines += [f"| {label} | {count} |" for label, count in sorted(self.written.items())]
        lines.append(f"| all | {sum(self.written.values())} |")
        return "\n".join(lines)


def is_complete(sidecar: Path) -> bool:
    """The sidecar is readable and its photo has the size and sha256 it records."""
    try:
        meta = json.loads(sidecar.read_text())
        data = sidecar.with_suffix(".jpg").read_bytes()
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and len(data) == meta.get("size")
        and hashlib.sha256(data).hexdigest() == meta.get("sha256")
    )


def tidy(out: Path, summary: Summary) -> set[str]:
    """Remove what an earlier run left incomplete; return the photo ids already collected."""
    have: set[str] = set()
    for leftover in out.glob("*/.*.part"):
        leftover.unlink()
        summary.removed_incomplete += 1
    for sidecar in out.glob("*/*.json"):
        if is_complete(sidecar):
            have.add(str(json.loads(sidecar.read_text())["photo_id"]))
        else:
            logger.warning("removing incomplete %s and its photo: fetching it again", sidecar)
            sidecar.unlink()
            sidecar.with_suffix(".jpg").unlink(missing_ok=True)
            summary.removed_incomplete += 1
    for photo in out.glob("*/*.jpg"):
        if not photo.with_suffix(".json").exists():  # renamed in, but its sidecar never was
            photo.unlink()
            summary.removed_incomplete += 1
    return have


def sidecar_of(photo: classifier_pb2.LabelledPhoto) -> dict[str, Any]:
    return {
        "photo_id": photo.photo_id,
        "label": photo.label,
        "bin_id": photo.bin_id,
        "taken_at": photo.taken_at,
        "taken_at_utc": utc(photo.taken_at),
        "labelled_at": photo.labelled_at,
        "labelled_at_utc": utc(photo.labelled_at),
        "model_version": photo.model_version,
        "guesses": [{"label": g.label, "score": round(g.score, 4)} for g in photo.guesses],
        "trigger": photo.trigger,
        "sha256": photo.sha256,
        "size": len(photo.image),
    }


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def save(out: Path, photo: classifier_pb2.LabelledPhoto) -> Path:
    """Write one streamed photo and its sidecar under ``out``; returns the photo's path.

    Raises:
        CollectError: a name the bin sent is not safe as a path, or the photo is not what its
            sha256 says.
    """
    if not _LABEL.match(photo.label):
        raise CollectError(f"label {photo.label!r} is not a safe folder name")
    for what, name in (("bin id", photo.bin_id), ("photo id", photo.photo_id)):
        if not _NAME.match(name):
            raise CollectError(f"{what} {name!r} is not a safe file name")
    if hashlib.sha256(photo.image).hexdigest() != photo.sha256:
        raise CollectError(f"photo {photo.photo_id} arrived damaged (sha256 differs)")
    folder = out / photo.label
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{photo.bin_id}_{photo.photo_id}.jpg"
    write_atomically(path, photo.image)
    write_atomically(path.with_suffix(".json"), json.dumps(sidecar_of(photo), indent=1).encode())
    return path


def collect(stub: classifier_pb2_grpc.ClassifierStub, out: Path, timeout: float) -> Summary:
    """Fetch every photo the bin has and ``out`` lacks.

    Raises:
        grpc.RpcError: the call failed or was cut off (what was written stays, complete).
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    have = tidy(out, summary)
    summary.already_there = len(have)
    request = classifier_pb2.ExportLabelledRequest(skip_photo_ids=sorted(have))
    for photo in stub.ExportLabelled(request, timeout=timeout):
        try:
            save(out, photo)
        except CollectError as err:
            logger.error("%s", err)
            summary.refused.append(str(err))
            continue
        summary.written[photo.label] += 1
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="smartbin-collect",
        description="Copy the photos filed on a bin's review page into a training folder.",
    )
    parser.add_argument(
        "--target",
        required=True,
        help="the bin's admin listener (on the bin: 127.0.0.1:50052), or its public port "
        "with an operator's client certificate (--ca/--cert/--key)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="training folder: one sub-folder per category"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="longest the whole export may take (s)"
    )
    add_tls_arguments(parser)
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser, args = parse_args(argv)
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    try:
        channel = open_channel(args.target, args.ca, args.cert, args.key, args.server_name, options)
    except ValueError as err:
        parser.error(str(err))
    with channel:
        try:
            summary = collect(classifier_pb2_grpc.ClassifierStub(channel), args.out, args.timeout)
        except grpc.RpcError as err:
            sys.exit(
                f"smartbin-collect: {err.code().name}: {err.details()}. The photos written so "
                f"far in {args.out} are complete; run the same command again to fetch the rest"
            )
    print(summary.table())
    print(
        f"{summary.already_there} photos were there already; "
        f"{summary.removed_incomplete} incomplete files from an earlier run removed"
    )
    if summary.refused:
        sys.exit(f"smartbin-collect: {len(summary.refused)} photos refused: {summary.refused[0]}")


if __name__ == "__main__":
    main()
