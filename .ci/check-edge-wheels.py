"""Every dependency of the edge (smartbin-edge and smartbin-contract) must be a prebuilt wheel for
the edge image on aarch64.

The edge image (deploy/edge/Dockerfile) is Debian bookworm with its own CPython 3.11 and glibc
2.36, so a wheel tagged manylinux_2_17 .. manylinux_2_36 aarch64 (or pure Python) installs there.
pip resolves those dependencies for exactly that platform with --only-binary=:all: and the
constraints the image uses; anything without such a wheel fails here instead of compiling on a
Pi.

    .venv/bin/python .ci/check-edge-wheels.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"  # Debian bookworm's python3
GLIBC_MINOR = 36  # Debian bookworm's glibc 2.36
PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(17, GLIBC_MINOR + 1)] + [
    "manylinux2014_aarch64"
]


# The distributions a bin installs (deploy/install-edge.sh); they require each other by name.
EDGE_PARTS = ("proto", "edge_service")


def edge_requirements() -> list[str]:
    """The third-party requirements of the edge's distributions (not the parts themselves)."""
    requirements: list[str] = []
    for part in EDGE_PARTS:
        project = tomllib.loads((ROOT / part / "pyproject.toml").read_text())["project"]
        requirements += [r for r in project["dependencies"] if not r.startswith("smartbin-")]
    return sorted(set(requirements))


def wheel_platform(filename: str) -> str:
    """The platform tag of a wheel file name: name-version[-build]-python-abi-platform.whl."""
    return filename.removesuffix(".whl").split("-")[-1]


def main() -> int:
    requirements = edge_requirements()
    platform_args = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-cache-dir",
            "--only-binary=:all:",
            *platform_args,
            "--python-version",
            PYTHON_VERSION,
            "--implementation",
            "cp",
            "--constraint",
            str(ROOT / "deploy" / "edge-constraints.txt"),
            "--dest",
            folder,
            *requirements,
        ]
        if subprocess.run(command).returncode != 0:
            print("FAIL: the edge does not resolve to aarch64 wheels (pip's message above)")
            return 1
        files = sorted(path.name for path in Path(folder).iterdir())
    bad = [name for name in files if not name.endswith(".whl")]
    bad += [
        name
        for name in files
        if name.endswith(".whl") and not wheel_platform(name).endswith(("aarch64", "any"))
    ]
    for name in files:
        print(f"  {name}")
    if bad:
        print(f"FAIL: not prebuilt for aarch64: {', '.join(bad)}")
        return 1
    print(
        f"OK: {len(files)} wheels for CPython {PYTHON_VERSION} on aarch64 "
        f"(glibc 2.{GLIBC_MINOR}) cover the edge: {', '.join(requirements)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
