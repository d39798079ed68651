"""The Open Inference Protocol's HTTP routes (``/v2/...``), over the model edge_service/oip.py
describes: health, server and model metadata, readiness and ``infer``.

``infer`` takes the protocol's JSON, where a BYTES element of the ``image`` input is the photo
in base64, and its binary tensor extension (what tritonclient sends): a JSON header of
``Inference-Header-Content-Length`` bytes, then each input's raw contents in turn, its size in
the input's ``binary_data_size`` parameter. Outputs come back as JSON, or as raw contents after
the JSON header when an output's ``binary_data`` parameter (or the request's
``binary_data_output``) asks for that.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_service.const import service_version
from edge_service.metrics import ServiceMetrics
from edge_service.oip import (
    EXTENSIONS,
    INPUT_NAME,
    MODEL_NAME,
    PLATFORM,
    SERVER_NAME,
    InferOutputs,
    OpenInferenceModel,
    checked_input,
    checked_outputs,
    deserialize_bytes,
    raw_contents,
)
from edge_service.web.api import ERRORS, in_worker
from edge_service.web.errors import HTTP_STATUS, Code, bad_request, read_body

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Open Inference Protocol"])
INFER = "HTTP ModelInfer"
HEADER_LENGTH = "inference-header-content-length"


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputTensor(_Loose):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(_Loose):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_Loose):
    """The protocol's inference request (its JSON part)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


@router.get("/v2/health/live", name="HTTP ServerLive", summary="Server live")
def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", name="HTTP ServerReady", summary="Server ready")
def server_ready(request: Request) -> JSONResponse:
    """200 while the bin serves; 503 once it is stopping."""
    ready = model_of(request).serving.is_set()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/v2", name="HTTP ServerMetadata", summary="Server metadata")
def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": service_version(), "extensions": list(EXTENSIONS)}


@router.get("/v2/models/{name}", name="HTTP ModelMetadata", responses=ERRORS)
@router.get("/v2/models/{name}/versions/{version}", name="HTTP ModelMetadata", responses=ERRORS)
def model_metadata(request: Request, name: str, version: str = "") -> dict[str, Any]:
    """The model's name, version, platform, input and outputs (docs/http-api.md)."""
    served, tensors = model_of(request).metadata(name, version)
    described = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]
    return {
        "name": MODEL_NAME,
        "versions": [served],
        "platform": PLATFORM,
        "inputs": described[:1],
        "outputs": described[1:],
    }


@router.get("/v2/models/{name}/ready", name="HTTP ModelReady", responses=ERRORS)
@router.get("/v2/models/{name}/versions/{version}/ready", name="HTTP ModelReady", responses=ERRORS)
def model_ready(request: Request, name: str, version: str = "") -> JSONResponse:
    """200 when the model is served and the bin is serving; 404 for a model it does not serve,
    503 while it stops."""
    model = model_of(request)
    model.find(name, version)  # 404, naming what is served
    ready = model.serving.is_set()
    return JSONResponse(
        {"name": name, "ready": ready},
        status_code=200 if ready else HTTP_STATUS[Code.UNAVAILABLE],
    )


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` written in place of each ``$ref``, so that it
    stands alone inside the OpenAPI description."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "the protocol's inference request: JSON, where each element of the "
        f"`{INPUT_NAME}` input (BYTES, shape [N]) is a photo in base64; or the binary tensor "
        "extension (a JSON header of Inference-Header-Content-Length bytes, then the raw "
        "input)",
        "content": {
            "application/json": {"schema": inline_refs(InferRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/v2/models/{name}/infer", name=INFER, responses=ERRORS, openapi_extra=INFER_BODY)
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    name=INFER,
    responses=ERRORS,
    openapi_extra=INFER_BODY,
)
async def infer(request: Request, name: str, version: str = "") -> Response:
    """Classify each photo of the `image` input; the outputs `labels`, `scores` (best first)
    and `unsure`."""
    metrics: ServiceMetrics = request.app.state.metrics
    body = await read_body(request, INFER)
    parsed, binary = parse_infer(body, request.headers.get(HEADER_LENGTH), metrics)
    photos = input_photos(parsed, binary, metrics)
    outputs = checked_outputs([o.name for o in parsed.outputs or []])
    top_k = top_k_of(parsed, metrics)
    model = model_of(request)
    result = await in_worker(
        request,
        len(body),
        INFER,
        lambda: model.infer(name, version, photos, top_k, INFER),
    )
    return infer_response(parsed, result, outputs)


def model_of(request: Request) -> OpenInferenceModel:
    model: OpenInferenceModel = request.app.state.inference
    return model


def parse_infer(
    body: bytes, header_length: str | None, metrics: ServiceMetrics
) -> tuple[InferRequest, bytes]:
    """The request's JSON part, parsed, and the binary data after it (none for plain JSON).

    Raises:
        Refused: INVALID_ARGUMENT (bad_request) naming what does not parse.
    """
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise bad_request(
                INFER,
                metrics,
                f"Inference-Header-Content-Length is {header_length!r}: give the byte length of "
                f"the JSON header, at most the {len(body)} bytes sent",
            )
        split = int(header_length)
    try:
        return InferRequest.model_validate(json.loads(body[:split])), body[split:]
    except ValidationError as err:  # JSON, but not the protocol's request
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise bad_request(INFER, metrics, f"not an inference request: {problems}") from err
    except ValueError as err:  # json's errors, UnicodeDecodeError included
        raise bad_request(INFER, metrics, f"the inference request is not JSON: {err}") from err


def input_photos(parsed: InferRequest, binary: bytes, metrics: ServiceMetrics) -> list[bytes]:
    """The photos of the one ``image`` input, from its binary data or its base64 JSON data."""
    if len(parsed.inputs) != 1:
        raise bad_request(
            INFER,
            metrics,
            f"{len(parsed.inputs)} inputs sent: the model takes one, {INPUT_NAME!r} (BYTES, an "
            "encoded photo per element)",
        )
    tensor = parsed.inputs[0]
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise bad_request(
                INFER,
                metrics,
                f"input {tensor.name!r} says binary_data_size {size!r} but {len(binary)} bytes "
                "follow the JSON header",
            )
        photos = deserialize_bytes(binary, f"input {tensor.name!r}")
    elif tensor.data is not None:
        photos = [from_base64(item, i, metrics) for i, item in enumerate(flat(tensor.data))]
    else:
        raise bad_request(
            INFER,
            metrics,
            f"input {tensor.name!r} has no data: send it as base64 in data, or as binary data",
        )
    checked_input(tensor.name, tensor.datatype, tensor.shape, len(photos))
    return photos


def flat(data: list[Any]) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from flat(item)
        else:
            yield item


def from_base64(item: Any, index: int, metrics: ServiceMetrics) -> bytes:
    try:
        if not isinstance(item, str):
            raise ValueError(f"a {type(item).__name__}, not a string")
        return base64.b64decode(item, validate=True)
    except (ValueError, binascii.Error) as err:
        raise bad_request(
            INFER,
            metrics,
            f"input {INPUT_NAME!r} element {index} is not a photo in base64 ({err}): in JSON, "
            "each element is the encoded photo in base64",
        ) from err


def top_k_of(parsed: InferRequest, metrics: ServiceMetrics) -> int:
    top_k = (parsed.parameters or {}).get("top_k", 0)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise bad_request(
            INFER, metrics, f"parameter top_k is {top_k!r}: an integer, the labels to return"
        )
    return top_k


def wants_binary(parsed: InferRequest, name: str) -> bool:
    """Whether output ``name`` goes back as raw contents after the JSON header."""
    for output in parsed.outputs or []:
        if output.name == name and output.parameters and "binary_data" in output.parameters:
            return bool(output.parameters["binary_data"])
    return bool((parsed.parameters or {}).get("binary_data_output", False))


def infer_response(parsed: InferRequest, result: InferOutputs, outputs: list[str]) -> Response:
    """The protocol's inference response: JSON, or JSON header and raw outputs."""
    described = []
    blobs = []
    for name in outputs:
        datatype, shape, array = result.tensor(name)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if wants_binary(parsed, name):
            blob = raw_contents(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            tensor["data"] = [item.decode() for item in array.ravel()]
        else:
            tensor["data"] = array.ravel().tolist()
        described.append(tensor)
    answer: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "model_version": result.model_version,
        "outputs": described,
    }
    if parsed.id is not None:
        answer["id"] = parsed.id
    header = json.dumps(answer).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
