#!/bin/sh
# Install the edge service (smartbin-edge and the contract it depends on, nothing else of this
# repository) into a virtual environment from prebuilt wheels.
#
# This one script is the install step of deploy/edge/Dockerfile and of the arm64 smoke test in CI
# (.ci/arm64-smoke), so what CI proves is what the image does.
#
#   deploy/install-edge.sh VENV PROJECT_DIR
#
# The venv is made with --system-site-packages so that picamera2, which Raspberry Pi OS ships as
# the apt package python3-picamera2 (its libcamera bindings are not on PyPI), stays importable.
# --only-binary=:all: makes a missing wheel an error instead of a compile on the Pi.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV PROJECT_DIR" >&2
    exit 2
fi
venv=$1
project=$2
python=${PYTHON:-python3}

"$python" -m venv --system-site-packages "$venv"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# smartbin's two edge distributions are pure Python: build their wheels, then install them (one
# pip call: the edge requires the contract by name and neither is on PyPI).
"$venv/bin/pip" wheel --quiet --no-cache-dir --no-deps --wheel-dir "$wheels" \
    "$project/proto" "$project/edge_service"
"$venv/bin/pip" install --quiet --no-cache-dir --only-binary=:all: \
    --constraint "$project/deploy/edge-constraints.txt" "$wheels"/smartbin_*.whl
# Fail here, not at first start, if a wheel does not load on this machine.
"$venv/bin/python" -c "import edge_service.server"
