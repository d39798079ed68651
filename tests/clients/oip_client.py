"""Asks a running bin the Open Inference Protocol's questions with tritonclient, as a user of
that client would, and prints the answers as JSON (run in .venv-clients, where tritonclient
and its own protobuf live: the bin's protobuf is newer than tritonclient accepts).

    python oip_client.py grpc|http HOST:PORT [PHOTO...] [--top-k K] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np


def client_module(transport: str) -> ModuleType:
    if transport == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["grpc", "http"])
    parser.add_argument("url")
    parser.add_argument("photos", nargs="*", type=Path)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--model", default="smartbin")
    args = parser.parse_args()
    module = client_module(args.transport)
    client = module.InferenceServerClient(args.url)
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(args.model),
    }
    try:
        report["metadata"] = metadata_of(client, args)
        if args.photos:
            report |= infer(module, client, args)
    except module.InferenceServerException as err:
        report["error"] = {"status": err.status(), "message": err.message()}
    json.dump(report, sys.stdout)


def metadata_of(client: Any, args: argparse.Namespace) -> dict:
    metadata = client.get_model_metadata(args.model)
    if args.transport == "grpc":
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(metadata, preserving_proto_field_name=True)
    return metadata


def infer(module: ModuleType, client: Any, args: argparse.Namespace) -> dict:
    """The photos through infer(), as a user of tritonclient sends them (its defaults)."""
    photos = np.array([p.read_bytes() for p in args.photos], dtype=np.object_)
    image = module.InferInput("image", [len(photos)], "BYTES")
    image.set_data_from_numpy(photos)
    parameters = {"top_k": args.top_k} if args.top_k else None
    result = client.infer(args.model, [image], parameters=parameters)
    response = result.get_response()
    return {
        "model_version": response["model_version"]
        if args.transport == "http"
        else response.model_version,
        "labels": [[x.decode() for x in row] for row in result.as_numpy("labels")],
        "scores": result.as_numpy("scores").tolist(),
        "unsure": result.as_numpy("unsure").tolist(),
    }


if __name__ == "__main__":
    main()
