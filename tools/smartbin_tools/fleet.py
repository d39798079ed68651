"""``smartbin-fleet``: roll a bundle out to the fleet through an S3-compatible bundle store.

    smartbin-fleet publish BUNDLE --store s3://BUCKET/PREFIX --canary bin-7 --soak 1h
    smartbin-fleet status --store s3://BUCKET/PREFIX
    smartbin-fleet halt --store s3://BUCKET/PREFIX
    smartbin-fleet rollback --store s3://BUCKET/PREFIX [--to ROLLOUT_ID]
    smartbin-fleet rollback-bin --target HOST:PORT [--ca --cert --key]

``publish`` uploads the bundle's files, then the rollout record last, so a bin never sees a
rollout whose files are not all there; bins poll the record (edge_service/rollout.py). Bins read
the store without credentials (a bucket policy that lets anyone, or the fleet's network, read
the prefix); each writes its status through a pre-signed upload address the record carries for
it, valid for ``--status-hours``. This tool uses boto3's usual credentials (environment, profile)
and ``--endpoint-url`` (or ``AWS_ENDPOINT_URL``) for a store other than AWS.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import grpc
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from smartbin.bundle import MANIFEST_NAME, SIGNATURE_NAME, BundleError, load_bundle
from smartbin.channel import add_tls_arguments, channel_from_args
from smartbin.rollout import (
    HISTORY_FOLDER,
    ROLLOUT_NAME,
    STATUS_FOLDER,
    BinStatus,
    Rollout,
    RolloutFile,
    check_bin_id,
)
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

# S3's longest pre-signed address: seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class FleetError(Exception):
    """Something the operator must fix; the message says what."""


@dataclass(frozen=True)
class Store:
    """A prefix in an S3 bucket, and the client that reaches it."""

    client: Any
    bucket: str
    prefix: str

    @classmethod
    def open(cls, url: str, endpoint_url: str | None) -> Store:
        match = re.match(r"^s3://([^/]+)/?(.*)$", url)
        if not match:
            raise FleetError(f"--store {url!r}: expected s3://BUCKET/PREFIX")
        bucket, prefix = match.group(1), match.group(2).strip("/")
        # Signature version 4 for the pre-signed status uploads: what every S3 store takes.
        client = boto3.client(
            "s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4")
        )
        return cls(client, bucket, f"{prefix}/" if prefix else "")

    def key(self, name: str) -> str:
        return self.prefix + name

    def read(self, name: str) -> bytes | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return bytes(response["Body"].read())

    def write(self, name: str, data: bytes, content_type: str = "application/json") -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self.key(name), Body=data, ContentType=content_type
        )

    def names(self, folder: str) -> list[str]:
        """Object names under ``folder``, relative to the prefix."""
        paginator = self.client.get_paginator("list_objects_v2")
        names = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(folder + "/")):
            names += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
        return names

    def status_url(self, bin_id: str, seconds: int) -> str:
        return str(
            self.client.generate_presigned_url(
                "put_object",
                Params={"Bucket": self.bucket, "Key": self.key(f"{STATUS_FOLDER}/{bin_id}.json")},
                ExpiresIn=seconds,
            )
        )

    def bin_url(self) -> str:
        """The address bins put in ``fleet.store_url`` (path-style)."""
        endpoint = str(self.client.meta.endpoint_url).rstrip("/")
        return f"{endpoint}/{self.bucket}/{self.prefix}"


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h`` or ``2d``.

    Raises:
        argparse.ArgumentTypeError: the text is none of those.
    """
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use seconds or a number with s, m, h or d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def bin_id(text: str) -> str:
    try:
        return check_bin_id(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def bundle_files(folder: Path) -> dict[str, Path]:
    """The files a bin needs from the bundle at ``folder``, checked: the manifest, each model
    it names and the signature when there is one.

    Raises:
        FleetError: the bundle does not load (the message says why).
    """
    try:
        bundle = load_bundle(folder)
    except BundleError as err:
        raise FleetError(f"{folder} is not a bundle a bin would serve: {err}") from err
    names = [MANIFEST_NAME, *(model.file for model in bundle.models)]
    if (folder / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)
    return {name: folder / name for name in names}


def describe(path: Path) -> RolloutFile:
    data = path.read_bytes()
    return RolloutFile(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def new_rollout_id() -> str:
    """Sortable by time, unique without coordination."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def status_urls(store: Store, bins: list[str], seconds: float) -> dict[str, str]:
    lifetime = int(min(MAX_PRESIGN_SECONDS, max(60.0, seconds)))
    return {name: store.status_url(name, lifetime) for name in dict.fromkeys(bins)}


def put_rollout(store: Store, rollout: Rollout) -> None:
    """The history copy first, then ``rollout.json``: the record bins act on comes last."""
    data = rollout.model_dump_json(indent=2).encode()
    store.write(f"{HISTORY_FOLDER}/{rollout.rollout_id}.json", data)
    store.write(ROLLOUT_NAME, data)


def publish(
    store: Store,
    folder: Path,
    canary: list[str],
    bins: list[str],
    soak: float,
    status_seconds: float,
) -> Rollout:
    """Upload the bundle at ``folder``, then the rollout that points bins at it.

    Raises:
        FleetError: the bundle is invalid.
    """
    files = bundle_files(folder)
    rollout_id = new_rollout_id()
    described = {name: describe(path) for name, path in files.items()}
    for name, path in files.items():
        store.write(f"bundles/{rollout_id}/{name}", path.read_bytes(), "application/octet-stream")
    rollout = Rollout(
        rollout_id=rollout_id,
        version=load_bundle(folder).version,
        files=described,
        canary=tuple(canary),
        soak_seconds=soak,
        created_at=time.time(),
        status_urls=status_urls(store, [*canary, *bins], soak + status_seconds),
    )
    put_rollout(store, rollout)
    return rollout


def current_rollout(store: Store) -> Rollout:
    data = store.read(ROLLOUT_NAME)
    if data is None:
        raise FleetError(f"no {ROLLOUT_NAME} in the store: publish a bundle first")
    return Rollout.model_validate_json(data)


def history(store: Store) -> list[Rollout]:
    """Every rollout published, oldest first."""
    rollouts = []
    for name in store.names(HISTORY_FOLDER):
        data = store.read(name)
        if data is not None:
            rollouts.append(Rollout.model_validate_json(data))
    return sorted(rollouts, key=lambda rollout: rollout.created_at)


def halt(store: Store) -> Rollout:
    """Stop the current rollout: bins that have not swapped yet keep their model."""
    halted = current_rollout(store).model_copy(update={"halted": True})
    put_rollout(store, halted)
    return halted


def rollback(store: Store, to: str | None, status_seconds: float) -> Rollout:
    """Publish an earlier rollout's bundle again, to every bin at once (no canary, no soak).

    Bins that still keep that bundle as their previous one swap back without a download.

    Raises:
        FleetError: there is no earlier rollout (or none with the id ``to``).
    """
    now = current_rollout(store)
    served = now.files[MANIFEST_NAME].sha256
    published = history(store)
    if to is not None:
        chosen = [r for r in published if r.rollout_id == to]
    else:  # the latest earlier rollout of another bundle
        earlier = [r for r in published if r.created_at < now.created_at]
        chosen = [r for r in earlier if r.files[MANIFEST_NAME].sha256 != served][-1:]
    if not chosen:
        raise FleetError(
            f"no rollout {to} in the store" if to else "no earlier bundle to roll back to"
        )
    source = chosen[0]
    rollout_id = new_rollout_id()
    for name in source.files:
        store.client.copy_object(
            Bucket=store.bucket,
            Key=store.key(f"bundles/{rollout_id}/{name}"),
            CopySource={"Bucket": store.bucket, "Key": store.key(source.bundle_prefix + name)},
        )
    bins = [*now.status_urls, *source.status_urls]
    rollout = Rollout(
        rollout_id=rollout_id,
        version=source.version,
        files=source.files,
        canary=(),
        soak_seconds=0.0,
        created_at=time.time(),
        status_urls=status_urls(store, bins, status_seconds),
    )
    put_rollout(store, rollout)
    return rollout


def statuses(store: Store) -> list[BinStatus]:
    found = []
    for name in store.names(STATUS_FOLDER):
        data = store.read(name)
        try:
            found.append(BinStatus.model_validate_json(data or b""))
        except ValidationError as err:
            print(f"{name}: unreadable status: {err}", file=sys.stderr)
    return found


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def status_table(rollout: Rollout, found: list[BinStatus]) -> str:
    """Where each bin stands: one row per bin that reported or was named in the rollout."""
    by_bin = {status.bin: status for status in found}
    names = sorted({*by_bin, *rollout.canary, *rollout.status_urls})
    now = time.time()
    header = f"{'bin':<16} {'role':<7} {'state':<12} {'version':<20} {'unsure':>7} {'was':>5}  age"
    lines = [header]
    for name in names:
        role = "canary" if rollout.is_canary(name) else "-"
        status = by_bin.get(name)
        if status is None or status.rollout_id != rollout.rollout_id:
            state = "no report"
            version = status.version if status else "?"
            lines.append(f"{name:<16} {role:<7} {state:<12} {version:<20}")
            continue
        age = f"{now - status.updated_at:.0f} s"
        lines.append(
            f"{name:<16} {role:<7} {status.state:<12} {status.version:<20} "
            f"{_rate(status.unsure_rate):>7} {_rate(status.baseline_unsure_rate):>5}  {age}"
        )
        if status.reason:
            lines.append(f"{'':<16} {status.reason}")
    return "\n".join(lines)


def describe_rollout(rollout: Rollout) -> str:
    soak_end = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rollout.soak_ends_at))
    canary = ", ".join(rollout.canary) or "none"
    halted = " (HALTED)" if rollout.halted else ""
    return (
        f"rollout {rollout.rollout_id}{halted}: {rollout.version}, canary {canary}, "
        f"the rest after {soak_end}"
    )


def rollback_bin(channel: grpc.Channel) -> classifier_pb2.ModelInfo:
    """RollbackModel on one bin (its admin listener, or its public port over mutual TLS)."""
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    return stub.RollbackModel(classifier_pb2.RollbackModelRequest(), timeout=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartbin-fleet", description="Roll bundles out to the fleet through a bundle store."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def store_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--store", required=True, help="s3://BUCKET/PREFIX of the fleet")
        command.add_argument(
            "--endpoint-url", help="S3-compatible endpoint (MinIO...); default AWS_ENDPOINT_URL"
        )
        return command

    pub = store_command("publish", "upload a bundle and start its rollout")
    pub.add_argument("bundle", type=Path, help="bundle folder (manifest.json, model...)")
    pub.add_argument("--canary", nargs="*", type=bin_id, default=[], help="bins that go first")
    pub.add_argument(
        "--bins", nargs="*", type=bin_id, default=[], help="other bins that report their status"
    )
    pub.add_argument("--soak", type=parse_duration, default=3600.0, help="e.g. 30m, 1h (1h)")
    pub.add_argument(
        "--status-hours",
        type=float,
        default=24.0,
        help="bins may upload their status this long after the soak (7 days at most in all)",
    )
    store_command("status", "show the current rollout and where each bin stands")
    store_command("halt", "stop the current rollout where it is")
    back = store_command("rollback", "publish the bundle before the current one to every bin")
    back.add_argument("--to", help="the rollout id to go back to (default: the one before)")
    back.add_argument("--status-hours", type=float, default=24.0)
    one = commands.add_parser("rollback-bin", help="RollbackModel on one bin")
    one.add_argument("--target", required=True, help="the bin's admin listener or mTLS port")
    add_tls_arguments(one)
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.command == "rollback-bin":
        with channel_from_args(parser, args) as channel:
            info = rollback_bin(channel)
        print(
            f"{args.target}: serving {info.model_version}, previous {info.previous_model_version}"
        )
        return
    store = Store.open(args.store, args.endpoint_url)
    if args.command == "publish":
        rollout = publish(
            store, args.bundle, args.canary, args.bins, args.soak, args.status_hours * 3600
        )
        print(describe_rollout(rollout))
        print(f"bins poll {store.bin_url()}{ROLLOUT_NAME} (fleet.store_url: {store.bin_url()})")
    elif args.command == "status":
        rollout = current_rollout(store)
        print(describe_rollout(rollout))
        print(status_table(rollout, statuses(store)))
    elif args.command == "halt":
        print(describe_rollout(halt(store)))
    elif args.command == "rollback":
        print(describe_rollout(rollback(store, args.to, args.status_hours * 3600)))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args, parser)
    except FleetError as err:
        sys.exit(f"smartbin-fleet: {err}")
    except (ClientError, BotoCoreError) as err:
        sys.exit(f"smartbin-fleet: the store refused: {err}")
    except grpc.RpcError as err:
        sys.exit(f"smartbin-fleet: {err.code().name}: {err.details()}")


if __name__ == "__main__":
    main()
