"""The HTTP/JSON API: ``POST /api/v1/classify`` (a photo as the body or as a multipart field
``image``), ``GET /api/v1/model`` and ``GET /api/v1/health``.

Each answers what its gRPC call answers (``Classify``, ``GetModelInfo``, the health service),
through the same code: a classification goes through the one path
(:class:`~edge_service.classify.UploadClassifier`), within the same body size limit
(``max_message_bytes``), photo memory and ``max_workers``, and is counted in the same metrics
under ``method="HTTP Classify"`` (docs/http-api.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from edge_service.classify import Answer, UploadClassifier
from edge_service.config import ServiceConfig
from edge_service.const import API_VERSION, service_version
from edge_service.metrics import ServiceMetrics
from edge_service.web.errors import HTTP_STATUS, Code, bad_request, read_body
from smartbin.bundle import BUNDLE_FORMAT_VERSION

logger = logging.getLogger(__name__)

T = TypeVar("T")
router = APIRouter(tags=["smartbin"])
CLASSIFY = "HTTP Classify"
# The multipart field that carries the photo.
PHOTO_FIELD = "image"


class PredictionOut(BaseModel):
    label: str
    score: float = Field(description="probability, 0 to 1")


class TimingsOut(BaseModel):
    """Seconds spent in each stage, as in the gRPC StageTimings."""

    capture_seconds: float
    decode_seconds: float
    preprocess_seconds: float
    inference_seconds: float
    total_seconds: float


class ClassifyOut(BaseModel):
    """Classify's answer: the labels best first, as smartbin.v1.ClassifyResponse."""

    predictions: list[PredictionOut]
    model_version: str
    unsure: bool = Field(description="the best score is below the confidence threshold")
    timings: TimingsOut


class ModelInfoOut(BaseModel):
    """GetModelInfo's answer (smartbin.v1.ModelInfo), the manifest as an object."""

    labels: list[str]
    input_height: int
    input_width: int
    quantization: str
    model_version: str
    model_sha256: str
    previous_model_version: str = Field(
        description="the model RollbackModel would swap back to; empty when there is none"
    )
    metrics: dict[str, float]
    manifest: dict[str, Any]
    service_version: str
    bundle_format_version: int
    api_version: str


class HealthOut(BaseModel):
    status: str = Field(description="SERVING, or NOT_SERVING while the service stops")
    model_version: str


class ErrorOut(BaseModel):
    """Every error's body: what to fix, and the gRPC status code of the refusal."""

    error: str
    code: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in (
        (400, "INVALID_ARGUMENT: not a photo it can decode, a bad top_k or a malformed body"),
        (413, "RESOURCE_EXHAUSTED: the body is over max_message_bytes"),
        (429, "RESOURCE_EXHAUSTED: the photo memory or max_concurrent_rpcs is taken; retry"),
        (503, "UNAVAILABLE: every worker stayed busy, or the service is stopping"),
    )
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the photo (JPEG, PNG, WebP, BMP, GIF, TIFF), as the body or as the "
        f"multipart field `{PHOTO_FIELD}`",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {PHOTO_FIELD: {"type": "string", "format": "binary"}},
                    "required": [PHOTO_FIELD],
                }
            },
        },
    }
}


@router.post(
    "/api/v1/classify",
    name=CLASSIFY,
    summary="Classify a photo",
    response_model=ClassifyOut,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
)
async def classify(
    request: Request,
    top_k: int = Query(0, ge=0, description="how many labels to return, best first; 0: all"),
) -> ClassifyOut:
    """Classify one photo sent as the request body (any image Content-Type, or
    application/octet-stream) or as the multipart/form-data field `image`; the answer is
    gRPC Classify's."""
    body = await read_body(request, CLASSIFY)
    photo = await photo_of(request, body)
    uploads: UploadClassifier = request.app.state.uploads
    answer = await in_worker(
        request, len(body), CLASSIFY, lambda: uploads.classify(photo, top_k, CLASSIFY)
    )
    return classify_out(answer, top_k)


async def photo_of(request: Request, body: bytes) -> bytes:
    """The photo: the multipart field ``image``, or else the body itself.

    Raises:
        Refused: INVALID_ARGUMENT (counted as bad_request) for an empty body, or a multipart
            body that does not parse or has no ``image`` file.
    """
    metrics: ServiceMetrics = request.app.state.metrics
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await multipart_photo(request, body)
    if not body:
        raise bad_request(
            CLASSIFY,
            metrics,
            "the request has no photo: send it as the body (Content-Type: image/jpeg...) or as "
            f"the multipart field {PHOTO_FIELD!r} (curl -F {PHOTO_FIELD}=@photo.jpg)",
        )
    return body


async def multipart_photo(request: Request, body: bytes) -> bytes:
    metrics: ServiceMetrics = request.app.state.metrics

    async def replay() -> dict[str, Any]:  # the body, read already within the size limit
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except (MultiPartException, HTTPException) as err:  # Starlette raises either
        detail = err.message if isinstance(err, MultiPartException) else err.detail
        raise bad_request(
            CLASSIFY, metrics, f"the multipart body does not parse: {detail}"
        ) from err
    try:
        upload = form.get(PHOTO_FIELD)
        if not isinstance(upload, UploadFile):
            raise bad_request(
                CLASSIFY,
                metrics,
                f"the multipart body has no file field {PHOTO_FIELD!r}: send the photo as "
                f"-F {PHOTO_FIELD}=@photo.jpg",
            )
        return await upload.read()
    finally:
        await form.close()  # its spooled files


async def in_worker(request: Request, size: int, method: str, work: Callable[[], T]) -> T:
    """Run ``work`` on a thread, holding a ``size``-byte request in the photo memory and one of
    the ``max_workers`` places (waited for up to request_timeout_seconds), as gRPC calls do."""
    uploads: UploadClassifier = request.app.state.uploads
    config: ServiceConfig = request.app.state.config

    def run() -> T:
        with (
            uploads.holding_request(size, method),
            uploads.working(config.request_timeout_seconds, method),
        ):
            return work()

    return await run_in_threadpool(run)


def classify_out(answer: Answer, top_k: int) -> ClassifyOut:
    t = answer.timings
    return ClassifyOut(
        predictions=[PredictionOut(label=p.label, score=p.score) for p in answer.top(top_k)],
        model_version=answer.model_version,
        unsure=answer.unsure,
        timings=TimingsOut(
            capture_seconds=t.capture,
            decode_seconds=t.decode,
            preprocess_seconds=t.preprocess,
            inference_seconds=t.inference,
            total_seconds=t.total,
        ),
    )


@router.get("/api/v1/model", name="HTTP GetModelInfo", summary="The served model")
def model_info(request: Request) -> ModelInfoOut:
    """What gRPC GetModelInfo answers: labels, input size, versions, measured metrics."""
    models = request.app.state.runtime.models
    classifier = models.current
    bundle = classifier.bundle
    size = bundle.preprocessing.input_size
    return ModelInfoOut(
        labels=list(bundle.labels),
        input_height=size,
        input_width=size,
        quantization=classifier.model.quantization,
        model_version=bundle.version,
        model_sha256=classifier.model.sha256,
        previous_model_version=models.previous_version,
        metrics=bundle.flat_metrics(),
        manifest=bundle.manifest.model_dump(mode="json"),
        service_version=service_version(),
        bundle_format_version=BUNDLE_FORMAT_VERSION,
        api_version=API_VERSION,
    )


@router.get(
    "/api/v1/health",
    name="HTTP Health",
    summary="Whether the bin is serving",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "NOT_SERVING: the service is stopping"}},
)
def health(request: Request) -> JSONResponse:
    """200 SERVING while the bin answers classifications; 503 NOT_SERVING once it is stopping
    (as the gRPC health service's overall status)."""
    serving = request.app.state.inference.serving.is_set()
    answer = HealthOut(
        status="SERVING" if serving else "NOT_SERVING",
        model_version=request.app.state.runtime.models.current.bundle.version,
    )
    status = 200 if serving else HTTP_STATUS[Code.UNAVAILABLE]
    return JSONResponse(answer.model_dump(), status_code=status)
