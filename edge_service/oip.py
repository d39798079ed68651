"""The Open Inference Protocol (KServe's predict API v2) on the bin, for clients that speak it
(tritonclient, KServe's and Seldon's tools): its gRPC service ``inference.GRPCInferenceService``,
on the same port as smartbin.v1, and the model it describes, which the web port's ``/v2`` routes
serve too (edge_service/web/v2.py).

The bin serves one model, named :data:`MODEL_NAME` whatever bundle is loaded (clients keep their
name across bundles); its version is the bundle's ``version``. Its input is the encoded photo, not
pixels: ``image``, BYTES, shape ``[N]`` (one JPEG/PNG/WebP/BMP file per element). Its outputs, for
each photo, rank the labels best first, as ``Classify`` does: ``labels`` (BYTES, ``[N, K]``),
``scores`` (FP32, ``[N, K]``) and ``unsure`` (BOOL, ``[N]``); K is every label, or the request
parameter ``top_k`` when it is set. Each photo goes through the one classification path
(:class:`edge_service.classify.UploadClassifier`), so every answer, limit and refusal is
``Classify``'s.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from edge_service.classify import Answer, Refused, UploadClassifier
from edge_service.const import service_version
from edge_service.guard import counted
from edge_service.metrics import ServiceMetrics
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from smartbin.model import TFLiteClassifier

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The one model's name: fixed, so that a client's model name survives a new bundle.
MODEL_NAME = "smartbin"
SERVER_NAME = "smartbin"
PLATFORM = "tflite"
# The HTTP extension edge_service/web/v2.py speaks besides JSON (what tritonclient sends).
EXTENSIONS = ("binary_tensor_data",)
INPUT_NAME = "image"
OUTPUT_NAMES = ("labels", "scores", "unsure")


@dataclass(frozen=True)
class TensorMetadata:
    """A tensor as ModelMetadata describes it; -1: a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InferOutputs:
    """The answers to one inference request, as the protocol's output tensors.

    Attributes:
        model_version: the bundle version that answered.
        labels: ``[N][K]`` label names, best first.
        scores: float32 ``[N, K]``, the matching scores.
        unsure: bool ``[N]``, whether each answer is below the confidence threshold.
    """

    model_version: str
    labels: list[list[str]]
    scores: np.ndarray
    unsure: np.ndarray

    def tensor(self, name: str) -> tuple[str, list[int], np.ndarray]:
        """The output ``name`` as (datatype, shape, array); labels as an object array of bytes."""
        if name == "scores":
            return "FP32", list(self.scores.shape), self.scores
        if name == "unsure":
            return "BOOL", list(self.unsure.shape), self.unsure
        labels = np.array(
            [[label.encode() for label in row] for row in self.labels], dtype=object
        ).reshape(self.scores.shape)
        return "BYTES", list(self.scores.shape), labels


class OpenInferenceModel:
    """The served bundle as the Open Inference Protocol's one model, for both transports.

    Args:
        uploads: the classification path every route shares.
    """

    def __init__(self, uploads: UploadClassifier) -> None:
        self.uploads = uploads
        # Ready from start until the service stops (health turns NOT_SERVING at the same moment).
        self.serving = threading.Event()

    @property
    def classifier(self) -> TFLiteClassifier:
        return self.uploads.runtime.models.current

    def find(self, name: str, version: str = "") -> TFLiteClassifier:
        """The served model when ``name`` (and ``version``, when given) are what is served.

        Raises:
            Refused: NOT_FOUND, naming the model and version that are served.
        """
        classifier = self.classifier
        served = classifier.bundle.version
        if name != MODEL_NAME:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"no model named {name!r} here: this bin serves one model, {MODEL_NAME!r} "
                f"(version {served!r})",
            )
        if version and version != served:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"model {MODEL_NAME!r} has no version {version!r}: version {served!r} is "
                "served (or leave the version out)",
            )
        return classifier

    def ready(self, name: str, version: str = "") -> bool:
        try:
            self.find(name, version)
        except Refused:
            return False
        return self.serving.is_set()

    def metadata(self, name: str, version: str = "") -> tuple[str, list[TensorMetadata]]:
        """The served version, and the input and output tensors (ModelMetadata)."""
        classifier = self.find(name, version)
        labels = len(classifier.bundle.labels)
        tensors = [
            TensorMetadata(INPUT_NAME, "BYTES", (-1,)),
            TensorMetadata("labels", "BYTES", (-1, labels)),
            TensorMetadata("scores", "FP32", (-1, labels)),
            TensorMetadata("unsure", "BOOL", (-1,)),
        ]
        return classifier.bundle.version, tensors

    def infer(
        self,
        name: str,
        version: str,
        photos: Sequence[bytes],
        top_k: int,
        method: str,
        time_left: Callable[[], float | None] = lambda: None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> InferOutputs:
        """Classify each photo of the ``image`` input.

        Raises:
            Refused: an unknown model or version, no photo, a bad top_k, or any refusal of
                the classification path (the first photo refused ends the request).
        """
        self.find(name, version)
        if not photos:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {INPUT_NAME!r} holds no photo: send shape [1] with one encoded photo",
            )
        if top_k < 0:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"top_k is {top_k}: use 0 (all labels) or more"
            )
        answers = [
            self.uploads.classify(photo, top_k, method, time_left, is_active) for photo in photos
        ]
        return outputs_of(answers, top_k)


def outputs_of(answers: Sequence[Answer], top_k: int) -> InferOutputs:
    ranked = [answer.top(top_k) for answer in answers]
    versions = {answer.model_version for answer in answers}
    return InferOutputs(
        # A reload between two photos of one request: say which versions answered.
        model_version=",".join(sorted(versions)),
        labels=[[p.label for p in row] for row in ranked],
        scores=np.array([[p.score for p in row] for row in ranked], dtype=np.float32),
        unsure=np.array([answer.unsure for answer in answers], dtype=bool),
    )


def deserialize_bytes(raw: bytes, what: str) -> list[bytes]:
    """The elements of a BYTES tensor in the protocol's raw form: each a 4-byte little-endian
    length, then that many bytes.

    Raises:
        Refused: INVALID_ARGUMENT when the lengths do not add up to the data.
    """
    elements = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, _bad_bytes(what, offset, len(raw)))
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, _bad_bytes(what, offset, len(raw)))
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def _bad_bytes(what: str, offset: int, total: int) -> str:
    return (
        f"{what} is not a BYTES tensor's raw form (each element a 4-byte little-endian length, "
        f"then its bytes): an element at byte {offset} runs past the {total} bytes sent"
    )


def serialize_bytes(elements: np.ndarray) -> bytes:
    """A BYTES tensor's raw form (see :func:`deserialize_bytes`)."""
    return b"".join(struct.pack("<I", len(item)) + item for item in elements.ravel())


def raw_contents(array: np.ndarray, datatype: str) -> bytes:
    """An output tensor as the protocol's raw contents."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def checked_outputs(requested: Sequence[str]) -> list[str]:
    """The output names to answer: those requested, or all when none are.

    Raises:
        Refused: INVALID_ARGUMENT naming an output the model does not have.
    """
    for name in requested:
        if name not in OUTPUT_NAMES:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the model has no output {name!r}: ask for {', '.join(OUTPUT_NAMES)}",
            )
    return list(requested) or list(OUTPUT_NAMES)


def checked_input(name: str, datatype: str, shape: Sequence[int], count: int) -> None:
    """Checks an input tensor's name, datatype and shape against the ``count`` elements sent.

    Raises:
        Refused: INVALID_ARGUMENT saying what the model takes.
    """
    if name != INPUT_NAME:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the model has no input {name!r}: send one input, {INPUT_NAME!r}",
        )
    if datatype != "BYTES":
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {INPUT_NAME!r} is BYTES (each element an encoded photo), not {datatype!r}",
        )
    if len(shape) != 1 or shape[0] != count:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {INPUT_NAME!r} has shape {list(shape)} but {count} photo(s) were sent: "
            "its shape is [N], one encoded photo per element",
        )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over :class:`OpenInferenceModel`."""

    def __init__(self, model: OpenInferenceModel, metrics: ServiceMetrics) -> None:
        self.model = model
        self.metrics = metrics

    @counted("ServerLive")
    def ServerLive(  # noqa: N802 (the protocol's method names)
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @counted("ServerReady")
    def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.model.serving.is_set())

    @counted("ModelReady")
    def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.model.ready(request.name, request.version))

    @counted("ServerMetadata")
    def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=service_version(), extensions=list(EXTENSIONS)
        )

    @counted("ModelMetadata")
    def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            version, tensors = self.model.metadata(request.name, request.version)
        except Refused as err:
            context.abort(err.code, err.message)
        meta = pb.ModelMetadataResponse.TensorMetadata
        described = [meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]
        return pb.ModelMetadataResponse(
            name=MODEL_NAME,
            versions=[version],
            platform=PLATFORM,
            inputs=described[:1],
            outputs=described[1:],
        )

    @counted("ModelInfer")
    def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            photos = photos_of(request)
            outputs = checked_outputs([o.name for o in request.outputs])
            result = self.model.infer(
                request.model_name,
                request.model_version,
                photos,
                top_k_of(request.parameters),
                "ModelInfer",
                context.time_remaining,
                context.is_active,
            )
        except Refused as err:
            context.abort(err.code, err.message)
        return infer_response(request, result, outputs)


def photos_of(request: pb.ModelInferRequest) -> list[bytes]:
    """The photos of the request's one input, from its raw contents or its bytes_contents.

    Raises:
        Refused: INVALID_ARGUMENT for anything but one BYTES input named ``image``.
    """
    if len(request.inputs) != 1:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{len(request.inputs)} inputs sent: the model takes one, {INPUT_NAME!r} (BYTES, "
            "an encoded photo per element)",
        )
    tensor = request.inputs[0]
    if request.raw_input_contents:
        photos = deserialize_bytes(request.raw_input_contents[0], f"input {tensor.name!r}")
    else:
        photos = list(tensor.contents.bytes_contents)
    checked_input(tensor.name, tensor.datatype, list(tensor.shape), len(photos))
    return photos


def top_k_of(parameters: Mapping[str, pb.InferParameter]) -> int:
    """The request parameter ``top_k`` (int64), 0 (every label) when absent."""
    if "top_k" not in parameters:
        return 0
    top_k = parameters["top_k"]
    if top_k.WhichOneof("parameter_choice") != "int64_param":
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "parameter top_k is an int64: the labels to return"
        )
    return int(top_k.int64_param)


def infer_response(
    request: pb.ModelInferRequest, result: InferOutputs, outputs: Sequence[str]
) -> pb.ModelInferResponse:
    """The ModelInfer answer, with raw output contents (as Triton answers)."""
    response = pb.ModelInferResponse(
        model_name=MODEL_NAME, model_version=result.model_version, id=request.id
    )
    for name in outputs:
        datatype, shape, array = result.tensor(name)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw_contents(array, datatype))
    return response


def add_to_server(model: OpenInferenceModel, metrics: ServiceMetrics, server: grpc.Server) -> None:
    """Serve ``inference.GRPCInferenceService`` on ``server``."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(model, metrics), server)
