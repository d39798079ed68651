"""Service configuration: one pydantic model that rejects unknown keys, loadable from YAML."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_service.const import (
    DEFAULT_BUNDLE_DIR,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_GRPC_PORT,
    DEFAULT_METRICS_PORT,
)
from smartbin.rollout import check_bin_id


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CameraCommon(_Section):
    frame_interval_seconds: float = Field(
        0.2,
        ge=0.0,
        le=10.0,
        description="time between frames the bin looks at; 0: as fast as the camera delivers "
        "(for network streams, which queue up frames that are read more slowly)",
    )
    capture_timeout_seconds: float = Field(
        3.0, gt=0.0, description="longest wait for a fresh frame after a trigger"
    )
    stall_seconds: float = Field(
        10.0,
        gt=0.0,
        description="a frame read that has not returned after this long marks the camera down "
        "(a driver stuck inside a read raises nothing)",
    )
    retry_min_seconds: float = Field(0.5, gt=0.0, description="first wait before reopening")
    retry_max_seconds: float = Field(30.0, gt=0.0, description="longest wait between reopens")


class PiCameraConfig(_CameraCommon):
    """The Raspberry Pi camera through picamera2 (libcamera)."""

    type: Literal["picamera2"]
    index: int = Field(0, ge=0, description="which camera, for boards with two")
    width: int = Field(1280, ge=16)
    height: int = Field(960, ge=16)


class OpenCVCameraConfig(_CameraCommon):
    """A USB/V4L2 camera, a video file or a stream URL through OpenCV's VideoCapture."""

    type: Literal["opencv"]
    device: int | str = Field(0, description="device index, /dev/videoN, file or stream URL")
    width: int | None = Field(None, ge=16, description="requested width; default the camera's")
    height: int | None = Field(None, ge=16, description="requested height")


class ReplayCameraConfig(_CameraCommon):
    """Cycles through the photos of a folder in name order (demos and tests)."""

    type: Literal["replay"]
    folder: Path = Field(description="folder of JPEG/PNG/WebP/BMP photos")
    loop: bool = Field(True, description="start again after the last photo; else keep showing it")


CameraConfig = Annotated[
    PiCameraConfig | OpenCVCameraConfig | ReplayCameraConfig, Field(discriminator="type")
]


class GpioTriggerConfig(_Section):
    """A lid switch or IR beam on a GPIO pin, read through gpiozero."""

    pin: int | str = Field(description='GPIO number or gpiozero pin name, e.g. 17 or "BOARD11"')
    pull_up: bool | None = Field(
        True, description="internal pull-up (switch to ground); None: external resistor"
    )
    active_high: bool | None = Field(
        None, description="with pull_up None: whether a high level means active"
    )
    edge: Literal["activated", "deactivated"] = Field(
        "activated", description="which edge takes the photo (lid closed, beam broken...)"
    )
    bounce_seconds: float | None = Field(
        0.05, gt=0.0, description="contact bounce ignored by gpiozero"
    )
    delay_seconds: float = Field(
        0.0, ge=0.0, le=10.0, description="wait after the edge before the photo (item settles)"
    )


class MotionTriggerConfig(_Section):
    """Frame difference: fires once the scene has changed and then held still."""

    change_threshold: float = Field(
        0.08, gt=0.0, lt=1.0, description="mean pixel change (0..1) that counts as motion"
    )
    settle_threshold: float = Field(
        0.02, gt=0.0, lt=1.0, description="mean change below which two frames count as still"
    )
    settle_frames: int = Field(2, ge=1, le=100, description="still frames needed before a photo")


class TriggersConfig(_Section):
    debounce_seconds: float = Field(
        2.0, ge=0.0, description="gpio/motion triggers this soon after a capture are dropped"
    )
    gpio: GpioTriggerConfig | None = None
    motion: MotionTriggerConfig | None = None


class UnsureImagesConfig(_Section):
    """Where photos of unsure answers are kept for relabelling; oldest dropped first."""

    folder: Path
    max_files: int = Field(1000, ge=1)
    max_bytes: int = Field(200 * 1024 * 1024, ge=1024)


class LabelledImagesConfig(_Section):
    """Where photos filed on the review page are kept, one sub-folder per label
    (edge_service/labelled_store.py); ExportLabelled streams them off the bin."""

    folder: Path
    max_files: int = Field(20_000, ge=1, description="photos kept; filing more is refused")
    max_bytes: int = Field(
        2 * 2**30, ge=1024, description="bytes kept; filing beyond them is refused"
    )


class TLSConfig(_Section):
    """Certificates for the gRPC port. With ``client_ca`` set, callers must present a
    certificate signed by it (mutual TLS)."""

    cert: Path = Field(description="PEM certificate chain the service presents")
    key: Path = Field(description="PEM private key of that certificate")
    client_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, only clients with a certificate it signed get in",
    )


class WebConfig(_Section):
    """The bin's web port (edge_service/web/): the HTTP/JSON API, the Open Inference Protocol's
    HTTP routes (/v2/...) and, with ``review``, the review page; off by default."""

    enabled: bool = Field(False, description="serve the web port")
    host: str = Field(
        "127.0.0.1",
        description="address the web port binds; loopback by default: set 0.0.0.0 (with tls) "
        "to let other machines in",
    )
    port: int = Field(8080, ge=0, le=65535, description="web port; 0 picks a free one")
    tls: TLSConfig | None = Field(
        None,
        description="serve HTTPS with these PEM files, as the gRPC port's tls (with client_ca, "
        "callers must present a certificate it signed); plain HTTP when absent",
    )
    review: bool = Field(False, description="serve the review page of unsure photos")
    review_password_file: Path | None = Field(
        None,
        description="file holding the operator's password for the review page (HTTP basic "
        "auth, any user name); without it, and without tls.client_ca, the page answers "
        "loopback clients only",
    )
    review_recent: int = Field(
        24,
        ge=0,
        le=500,
        description="recent answers the review page shows, kept in memory with their photos",
    )
    review_recent_max_bytes: int = Field(
        32 * 2**20,
        ge=0,
        description="memory the recent answers' photos may take; the oldest go first",
    )


class AdminConfig(_Section):
    """Who may make the calls that change the bin (``ReloadModel``; edge_service/admin.py).

    The public gRPC port refuses them unless the caller presents a mutual-TLS client certificate
    named in ``allowed_clients``; the admin listener, on loopback only, serves them to operators
    on the bin itself."""

    enabled: bool = Field(True, description="run the admin listener")
    host: str = Field(
        "127.0.0.1",
        description="address the admin listener binds: loopback only (it has no authentication: "
        "whoever reaches it may reload the model)",
    )
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="admin listener port; default the gRPC port + 1 (50052), or a free port "
        "when the gRPC port is 0",
    )
    allowed_clients: list[str] = Field(
        default_factory=list,
        description="client certificate names (subject CN, or a DNS, URI, e-mail or IP subject "
        "alternative name) that may make admin calls on the public port; needs tls.client_ca",
    )

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, host: str) -> str:
        if not is_loopback(host):
            raise ValueError(
                f"admin.host {host!r} is not a loopback address: the admin listener has no "
                "authentication, so it binds 127.0.0.1, ::1 or localhost only; to administer "
                "the bin from elsewhere, use mutual TLS on the public port with "
                "admin.allowed_clients"
            )
        return host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BundleSigningConfig(_Section):
    """Which bundles the bin serves: those signed by a key it trusts (smartbin.signing).

    With ``required`` every bundle must be signed by one of ``trusted_keys`` (at start, on
    ``ReloadModel`` and when the watched folder changes), except the bundle shipped inside the
    package, which the package vouches for by its digest. Without it, a signature by a trusted
    key is still checked, and an unsigned bundle is served with a warning."""

    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="PEM Ed25519 public keys (smartbin-keygen's .pub) whose signatures the bin "
        "accepts",
    )
    required: bool = Field(
        False, description="serve only bundles signed by one of trusted_keys (or the shipped one)"
    )


class RegressionConfig(_Section):
    """When a canary rolls back by itself: its unsure or error rate on the new model, over at
    least ``min_answers`` answers, above the previous model's on this bin by more than the
    margin (absolute: 0.10 is ten percentage points)."""

    unsure_margin: float = Field(0.10, ge=0.0, le=1.0)
    error_margin: float = Field(0.05, ge=0.0, le=1.0)
    min_answers: int = Field(
        20,
        ge=1,
        description="answers on each model before the rates are compared (the previous "
        "model's unsure rate is compared only when it gave this many)",
    )


class FleetConfig(_Section):
    """Fleet rollouts (edge_service/rollout.py): the bin polls a bundle store over HTTP(S),
    downloads a published bundle, checks it and swaps it in, canaries first."""

    store_url: str = Field(
        description="HTTP(S) address of the store prefix holding rollout.json, e.g. "
        "https://s3.example.com/bucket/fleet/ (objects readable without credentials, by "
        "bucket policy or a private network)"
    )
    bin_id: str = Field(description="this bin's name in rollouts (canary lists, status)")
    bundles_dir: Path = Field(
        description="where downloaded bundles are kept, with the bin's rollout state; the "
        "bundle served and the previous one are never removed"
    )
    poll_seconds: float = Field(300.0, gt=0.0, description="how often the store is polled")
    keep_bundles: int = Field(3, ge=2, le=100, description="downloaded bundles kept on disk")
    ca: Path | None = Field(None, description="PEM CA bundle for an HTTPS store; else system")
    timeout_seconds: float = Field(30.0, gt=0.0, description="per request to the store")
    regression: RegressionConfig = Field(default_factory=RegressionConfig)

    @field_validator("store_url")
    @classmethod
    def _http_prefix(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"fleet.store_url {url!r} must be an http:// or https:// address of the store "
                "prefix (for S3: https://ENDPOINT/BUCKET/PREFIX/)"
            )
        return url if url.endswith("/") else url + "/"

    @field_validator("bin_id")
    @classmethod
    def _bin_name(cls, name: str) -> str:
        return check_bin_id(name)


class ServiceConfig(BaseModel):
    """Everything the edge service can be told. Unknown keys are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path = Field(DEFAULT_BUNDLE_DIR, description="model bundle folder to serve")
    host: str = Field("0.0.0.0", description="address the gRPC port binds")
    port: int = Field(
        DEFAULT_GRPC_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one"
    )
    metrics_host: str = Field("0.0.0.0", description="address the /metrics port binds")
    metrics_port: int = Field(
        DEFAULT_METRICS_PORT,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; 0 picks a free one",
    )
    num_threads: int | None = Field(
        None, ge=1, le=64, description="interpreter threads; default all cores"
    )
    interpreters: int = Field(
        1,
        ge=1,
        le=16,
        description="model interpreters running calls side by side; each adds about 10 MB "
        "resident and, on a busy gateway, calls per second (2 on 2 cores: +15-20 %)",
    )
    max_workers: int = Field(
        8,
        ge=1,
        le=256,
        description="Classifier calls computed at once; the others wait for one, up to their "
        "deadline",
    )
    max_concurrent_rpcs: int = Field(
        64,
        ge=1,
        description="calls (streams included) open at once, each with a thread of its own; "
        "beyond it callers get RESOURCE_EXHAUSTED",
    )
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request the gRPC port accepts"
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="largest decoded image (width x height) accepted"
    )
    # Overload and memory: what one caller, or many, can take (docs/hardening.md).
    decode_budget_bytes: int = Field(
        100 * 2**20,
        ge=8 * 2**20,
        description="memory for photos: the request messages being served and the decodes, "
        "each decode's worked out from the photo's header before decoding. A photo that alone "
        "needs more is refused (INVALID_ARGUMENT); one that finds the budget taken waits "
        "decode_wait_seconds, then gets RESOURCE_EXHAUSTED, as does a request that does not fit. "
        "The default keeps the service under 250 MB resident (a 1 GB Raspberry Pi)",
    )
    decode_wait_seconds: float = Field(
        2.0, ge=0.0, description="longest wait for the decode budget, within the call's deadline"
    )
    request_timeout_seconds: float = Field(
        10.0,
        gt=0.0,
        description="time a call may take to deliver its request message; then it is cancelled",
    )
    max_calls_per_connection: int = Field(
        16,
        ge=1,
        description="calls one client connection may have open at once (HTTP/2 streams); its "
        "further calls wait in the client",
    )
    confidence_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="below this best score an answer is unsure; default: the bundle's "
        "calibrated threshold (its manifest's calibration.unsure_below), or "
        f"{DEFAULT_CONFIDENCE_THRESHOLD} for a bundle without one",
    )
    grace_seconds: float = Field(5.0, ge=0.0, description="time calls in flight get at shutdown")
    camera: CameraConfig | None = Field(None, description="the bin's camera; None: no camera")
    triggers: TriggersConfig = Field(default_factory=TriggersConfig)
    unsure_images: UnsureImagesConfig | None = Field(
        None, description="keep photos of unsure answers on disk"
    )
    labelled_images: LabelledImagesConfig | None = Field(
        None, description="where the review page files labelled photos; needed by web.review"
    )
    bin_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="this bin's name, kept with every labelled photo; default fleet.bin_id, "
        "else the host name",
    )
    event_queue_size: int = Field(
        32, ge=1, le=10_000, description="events buffered per WatchEvents stream"
    )
    max_watchers: int = Field(4, ge=0, description="open WatchEvents streams allowed at once")
    max_health_watchers: int = Field(
        2, ge=0, description="open grpc.health.v1 Watch streams allowed at once"
    )
    reload_dirs: list[Path] = Field(
        default_factory=list,
        description="folders ReloadModel may load bundles from besides the one holding the "
        "configured bundle",
    )
    watch_bundle_seconds: float = Field(
        0.0, ge=0.0, description="poll the bundle folder this often and reload on change; 0: off"
    )
    tls: TLSConfig | None = Field(
        None, description="serve gRPC over TLS (mutual TLS with client_ca); plaintext when absent"
    )
    admin: AdminConfig = Field(
        default_factory=AdminConfig,
        description="who may reload the model: the loopback admin listener, and allowed "
        "mutual-TLS clients on the public port",
    )
    bundle_signing: BundleSigningConfig = Field(
        default_factory=BundleSigningConfig,
        description="serve only bundles signed by trusted keys",
    )
    web: WebConfig = Field(
        default_factory=WebConfig,
        description="the HTTP/JSON and Open Inference Protocol web port (and the review page)",
    )
    fleet: FleetConfig | None = Field(
        None, description="take model rollouts from a bundle store; None: no fleet rollouts"
    )

    @model_validator(mode="after")
    def verify_bin_settings(self) -> ServiceConfig:
        verify_triggers_have_camera(self)
        verify_watchers_leave_workers(self)
        verify_admin_clients_are_verified(self)
        verify_review_settings(self)
        settle_bin_id(self)
        return self


def verify_triggers_have_camera(config: ServiceConfig) -> None:
    if config.camera is None and (config.triggers.gpio or config.triggers.motion):
        raise ValueError("triggers need a camera: add a camera: section or remove the triggers")


def verify_watchers_leave_workers(config: ServiceConfig) -> None:
    # Each WatchEvents or health Watch stream holds a gRPC worker thread while it is open.
    if config.max_watchers + config.max_health_watchers >= config.max_workers:
        raise ValueError(
            f"max_watchers ({config.max_watchers}) plus max_health_watchers "
            f"({config.max_health_watchers}) must be below max_workers ({config.max_workers}) "
            "so that other calls still get a worker"
        )


def verify_admin_clients_are_verified(config: ServiceConfig) -> None:
    # A name is only worth trusting on a certificate the service checked against its CA.
    if config.admin.allowed_clients and (config.tls is None or config.tls.client_ca is None):
        raise ValueError(
            "admin.allowed_clients names client certificates, but the service checks none: "
            "set tls.client_ca (mutual TLS), or remove admin.allowed_clients and reload "
            "through the admin listener on the bin"
        )


def settle_bin_id(config: ServiceConfig) -> None:
    # One name per bin: a fleet bin's labelled photos carry the name its rollouts know it by.
    if config.fleet is None:
        return
    if "bin_id" not in config.model_fields_set:
        config.bin_id = config.fleet.bin_id
    elif config.bin_id != config.fleet.bin_id:
        raise ValueError(
            f"bin_id {config.bin_id!r} and fleet.bin_id {config.fleet.bin_id!r} name the same "
            "bin differently: remove bin_id (it defaults to fleet.bin_id) or make them equal"
        )


def verify_review_settings(config: ServiceConfig) -> None:
    # The page files photos and shows what the camera sees: only an operator may reach it.
    web = config.web
    if not (web.enabled and web.review):
        return
    if config.labelled_images is None:
        raise ValueError(
            "web.review files photos into labelled_images.folder: add a labelled_images: "
            "section with a folder"
        )
    if is_loopback(web.host):
        return
    if web.tls is None:
        raise ValueError(
            f"web.review on web.host {web.host!r}, which other machines reach: set web.tls "
            "(HTTPS) so that photos and the operator's password do not cross the network in "
            "the clear, or bind web.host to 127.0.0.1"
        )
    if web.tls.client_ca is None and web.review_password_file is None:
        raise ValueError(
            f"web.review on web.host {web.host!r} needs the operator's identity: set "
            "web.review_password_file or web.tls.client_ca (client certificates)"
        )


def load_config(path: Path | None = None, **overrides: object) -> ServiceConfig:
    """Read a YAML config file (optional) and apply non-None overrides on top."""
    data: dict[str, object] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        data.update(loaded)
    data.update({key: value for key, value in overrides.items() if value is not None})
    return ServiceConfig.model_validate(data)
