"""Generate the Python gRPC stubs beside the .proto files: proto/smartbin/v1 (our API) and
proto/inference (the Open Inference Protocol's, KServe's grpc_predict_v2.proto, kept as it is).

Run ``python proto/generate.py`` after editing a .proto; CI runs it with ``--check`` and fails
when the committed stubs differ from what the .proto files generate.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> None:
    """Run protoc over every .proto under proto/ into ``out_dir``."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def stale_files() -> list[str]:
    """Return the generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = sorted(Path(tmp).rglob("*_pb2*.py*"))
        return [
            str(f.relative_to(tmp))
            for f in fresh
            if not (PROTO_ROOT / f.relative_to(tmp)).exists()
            or not filecmp.cmp(f, PROTO_ROOT / f.relative_to(tmp), shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    if parser.parse_args().check:
        stale = stale_files()
        if stale:
            sys.exit(f"stale gRPC stubs, run `python proto/generate.py`: {', '.join(stale)}")
        print("gRPC stubs are up to date")
    else:
        generate(PROTO_ROOT)


if __name__ == "__main__":
    main()
