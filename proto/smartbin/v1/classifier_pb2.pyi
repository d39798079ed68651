from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "top_k")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("capture_seconds", "decode_seconds", "preprocess_seconds", "inference_seconds", "total_seconds")
    CAPTURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    capture_seconds: float
    decode_seconds: float
    preprocess_seconds: float
    inference_seconds: float
    total_seconds: float
    def __init__(self, capture_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., preprocess_seconds: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "timings", "unsure")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNSURE_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    timings: StageTimings
    unsure: bool
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., unsure: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("labels", "input_height", "input_width", "quantization", "model_version", "model_sha256", "metrics", "manifest_json", "service_version", "bundle_format_version", "api_version", "previous_model_version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_height: int
    input_width: int
    quantization: str
    model_version: str
    model_sha256: str
    metrics: _containers.ScalarMap[str, float]
    manifest_json: str
    service_version: str
    bundle_format_version: int
    api_version: str
    previous_model_version: str
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., quantization: _Optional[str] = ..., model_version: _Optional[str] = ..., model_sha256: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., manifest_json: _Optional[str] = ..., service_version: _Optional[str] = ..., bundle_format_version: _Optional[int] = ..., api_version: _Optional[str] = ..., previous_model_version: _Optional[str] = ...) -> None: ...

class CaptureRequest(_message.Message):
    __slots__ = ("top_k",)
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    def __init__(self, top_k: _Optional[int] = ...) -> None: ...

class ClassificationEvent(_message.Message):
    __slots__ = ("event_id", "timestamp", "trigger", "predictions", "model_version", "unsure", "timings", "missed_events")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNSURE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MISSED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    timestamp: float
    trigger: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    unsure: bool
    timings: StageTimings
    missed_events: int
    def __init__(self, event_id: _Optional[int] = ..., timestamp: _Optional[float] = ..., trigger: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., unsure: _Optional[bool] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., missed_events: _Optional[int] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportLabelledRequest(_message.Message):
    __slots__ = ("skip_photo_ids",)
    SKIP_PHOTO_IDS_FIELD_NUMBER: _ClassVar[int]
    skip_photo_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, skip_photo_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelledPhoto(_message.Message):
    __slots__ = ("photo_id", "label", "image", "sha256", "taken_at", "labelled_at", "bin_id", "model_version", "guesses", "trigger")
    PHOTO_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    LABELLED_AT_FIELD_NUMBER: _ClassVar[int]
    BIN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GUESSES_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    photo_id: str
    label: str
    image: bytes
    sha256: str
    taken_at: float
    labelled_at: float
    bin_id: str
    model_version: str
    guesses: _containers.RepeatedCompositeFieldContainer[Prediction]
    trigger: str
    def __init__(self, photo_id: _Optional[str] = ..., label: _Optional[str] = ..., image: _Optional[bytes] = ..., sha256: _Optional[str] = ..., taken_at: _Optional[float] = ..., labelled_at: _Optional[float] = ..., bin_id: _Optional[str] = ..., model_version: _Optional[str] = ..., guesses: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., trigger: _Optional[str] = ...) -> None: ...
