"""The review page: an operator files the bin's unsure photos and recent answers under the
right label, a new one or "not an item", and aims the camera; served by the web port when
``web.review`` is on.

Everything is under ``/review``: the page, each photo (``/review/photo/<kind>/<key>``), the
filing route htmx posts to (``/review/file/<kind>/<key>``, answering the card's new HTML), the
camera's latest frame (``/review/camera.jpg``) and a zip of the labelled photos
(``/review/export.zip``). ``kind`` is ``unsure`` (a photo the unsure store kept, named by its
file) or ``recent`` (one of the last answers kept in memory, named by its photo id).

Who may use it (:func:`require_operator`): with ``web.review_password_file``, whoever gives
that password (HTTP basic authentication, over the TLS the config requires off loopback); with
``web.tls.client_ca`` and no password, whoever the TLS handshake let in (a certificate the CA
signed); otherwise clients on the bin itself only. Filing takes an ``HX-Request`` header, which
a page of another site cannot send without the browser asking first, so a link elsewhere cannot
file photos with the operator's saved password.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import secrets
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from edge_service.config import ServiceConfig, is_loopback
from edge_service.labelled_store import (
    NOT_AN_ITEM,
    LabelError,
    LabelledStore,
    StoreFull,
    normalise_new_label,
)
from edge_service.recent import Guess, PhotoRecord, photo_id_for
from edge_service.runtime import BinRuntime
from edge_service.unsure_store import UnsureStore

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_FILES = {"htmx.min.js", "review.js", "review.css"}
# Keys 1..9 file the current photo under the model's first nine labels.
SHORTCUT_LABELS = 9
# The live view: the latest frame, made small enough to refresh every second over Wi-Fi.
CAMERA_VIEW_WIDTH = 640

templates = Jinja2Templates(directory=HERE / "templates")


def when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


templates.env.filters["when"] = when


# Who may use the page.


def _config(request: Request) -> ServiceConfig:
    config: ServiceConfig = request.app.state.config
    return config


def _runtime(request: Request) -> BinRuntime:
    runtime: BinRuntime = request.app.state.runtime
    return runtime


def password_matches(request: Request, password_file: Path) -> bool:
    """Whether the request's basic authentication carries the password in ``password_file``
    (any user name).

    Raises:
        HTTPException: 500 when the password file cannot be read.
    """
    try:
        expected = password_file.read_text().strip()
    except OSError as err:
        logger.error("web.review_password_file %s cannot be read: %s", password_file, err)
        raise HTTPException(500, "the bin cannot read web.review_password_file") from err
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not expected:
        return False
    try:
        _, _, given = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(given.encode(), expected.encode())


def require_operator(request: Request) -> None:
    """Let the operator in; refuse everyone else with what the bin's config must say instead.

    Raises:
        HTTPException: 401 asking for the password, or 403 for a client off the bin.
    """
    web = _config(request).web
    if web.review_password_file is not None:
        if not password_matches(request, web.review_password_file):
            raise HTTPException(
                401,
                "the review page needs the operator's password (web.review_password_file)",
                headers={"WWW-Authenticate": 'Basic realm="smartbin review"'},
            )
        return
    if web.tls is not None and web.tls.client_ca is not None:
        return  # the TLS handshake admitted only certificates the CA signed
    client = request.client.host if request.client else ""
    if not is_loopback(client):
        logger.warning("review page refused to %s: not on the bin", client)
        raise HTTPException(
            403,
            f"the review page answers clients on the bin itself only, and {client} is not: "
            "set web.review_password_file, or web.tls with client_ca, in the bin's config to "
            "let an operator in from elsewhere",
        )


def require_htmx(request: Request) -> None:
    """Filing comes from the page's own scripts (see the module's docstring).

    Raises:
        HTTPException: 400 without the HX-Request header.
    """
    if request.headers.get("hx-request") != "true":
        raise HTTPException(400, "file photos from the review page (an HX-Request header)")


router = APIRouter(prefix="/review", dependencies=[Depends(require_operator)])


# What the page lists.


@dataclass(frozen=True)
class Item:
    """A photo waiting for a label, as a card shows it."""

    kind: str  # "unsure" or "recent"
    key: str  # the unsure photo's file name, or the recent photo's id
    taken_at: float
    trigger: str
    model_version: str
    guesses: tuple[Guess, ...]
    unsure: bool

    @property
    def dom_id(self) -> str:
        return f"card-{self.kind}-{self.key.replace('.', '-')}"


def unsure_item(store: UnsureStore, path: Path) -> Item:
    """A kept unsure photo, described by its sidecar, or by its name (``<ms>-<n>-<label>``)
    when it was kept before sidecars were written."""
    details = store.details(path)
    stamp, _, rest = path.stem.partition("-")
    named_label = rest.partition("-")[2]
    taken_at = float(details.get("taken_at", int(stamp) / 1000 if stamp.isdigit() else 0))
    guesses = tuple(Guess(str(g["label"]), float(g["score"])) for g in details.get("guesses", []))
    return Item(
        kind="unsure",
        key=path.name,
        taken_at=taken_at,
        trigger=str(details.get("trigger", "")),
        model_version=str(details.get("model_version", "")),
        guesses=guesses or (Guess(named_label, math.nan),),
        unsure=True,
    )


def recent_item(record: PhotoRecord) -> Item:
    return Item(
        kind="recent",
        key=record.photo_id,
        taken_at=record.taken_at,
        trigger=record.trigger,
        model_version=record.model_version,
        guesses=record.guesses,
        unsure=record.unsure,
    )


def unsure_items(runtime: BinRuntime) -> list[Item]:
    store = runtime.pipeline.unsure_store
    if store is None:
        return []
    return [unsure_item(store, path) for path in reversed(store.files)]


def recent_items(runtime: BinRuntime) -> list[Item]:
    """The last answers, newest first; unsure ones are listed with the unsure photos when the
    bin keeps those."""
    if runtime.recent is None:
        return []
    keeps_unsure = runtime.pipeline.unsure_store is not None
    return [
        recent_item(record)
        for record in runtime.recent.newest_first()
        if not (record.unsure and keeps_unsure)
    ]


def labelled_store(runtime: BinRuntime) -> LabelledStore:
    if runtime.labelled is None:  # the config requires it with web.review
        raise HTTPException(503, "this bin keeps no labelled photos: add labelled_images")
    return runtime.labelled


def model_labels(runtime: BinRuntime) -> list[str]:
    return list(runtime.models.current.bundle.labels)


# The page.


@router.get("", response_class=HTMLResponse)
def page(request: Request) -> Response:
    runtime = _runtime(request)
    config = _config(request)
    return templates.TemplateResponse(
        request,
        "review.html",
        {
            "bin_id": config.bin_id,
            "model_version": runtime.models.current.bundle.version,
            "labels": model_labels(runtime),
            "shortcuts": SHORTCUT_LABELS,
            "not_an_item": NOT_AN_ITEM,
            "unsure": unsure_items(runtime),
            "recent": recent_items(runtime),
            "keeps_unsure": runtime.pipeline.unsure_store is not None,
            "counts": labelled_store(runtime).counts(),
            "camera": runtime.capture is not None,
        },
    )


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(404, f"no static file {name}")
    return FileResponse(HERE / "static" / name)


@router.get("/photo/{kind}/{key}")
def photo(request: Request, kind: str, key: str) -> Response:
    return Response(find_record(_runtime(request), kind, key).jpeg, media_type="image/jpeg")


def find_record(runtime: BinRuntime, kind: str, key: str) -> PhotoRecord:
    """The photo a card names, as a record the labelled store can file.

    Raises:
        HTTPException: 404 when it is gone (filed meanwhile, or evicted).
    """
    if kind == "recent" and runtime.recent is not None:
        record = runtime.recent.get(key)
        if record is not None:
            return record
    store = runtime.pipeline.unsure_store
    if kind == "unsure" and store is not None:
        path = store.find(key)
        if path is not None:
            try:
                jpeg = path.read_bytes()
            except OSError:
                path = None
        if path is not None:
            item = unsure_item(store, path)
            return PhotoRecord(
                photo_id_for(jpeg, item.taken_at),
                jpeg,
                item.taken_at,
                item.trigger,
                item.model_version,
                tuple(g for g in item.guesses if not math.isnan(g.score)),
                True,
            )
    raise HTTPException(404, f"no {kind} photo {key}: it was filed or dropped meanwhile")


def chosen_label(runtime: BinRuntime, label: str, new_label: str, not_an_item: str) -> str:
    """The label the operator chose: a model label, a new category name, or not an item.

    Raises:
        LabelError: none was chosen, or the model has no such label, or a new name cannot be
            a folder name.
    """
    if not_an_item:
        return NOT_AN_ITEM
    if new_label.strip():
        return normalise_new_label(new_label)
    if label in model_labels(runtime):
        return label
    if label:
        raise LabelError(f"the model has no label {label!r}: type it as a new category")
    raise LabelError("choose a label, type a new category or choose 'not an item'")


@router.post("/file/{kind}/{key}", response_class=HTMLResponse)
def file_photo(
    request: Request,
    kind: str,
    key: str,
    _htmx: Annotated[None, Depends(require_htmx)],
    label: Annotated[str, Form()] = "",
    new_label: Annotated[str, Form()] = "",
    not_an_item: Annotated[str, Form()] = "",
) -> Response:
    """File the photo; answer the card that replaces it (or the card again, with the error)."""
    runtime = _runtime(request)
    try:
        record = find_record(runtime, kind, key)
    except HTTPException as err:  # filed from another page meanwhile: say so on the card
        return templates.TemplateResponse(
            request, "gone.html", {"message": err.detail}, status_code=err.status_code
        )
    store = labelled_store(runtime)
    try:
        chosen = chosen_label(runtime, label, new_label, not_an_item)
        filed = store.file(record, chosen)
    except (LabelError, StoreFull) as err:
        return card(request, runtime, item_of(kind, key, record), str(err), 400)
    except OSError as err:
        logger.error("cannot file photo %s: %s", record.photo_id, err)
        message = f"the bin could not write the photo: {err.strerror or err}"
        return card(request, runtime, item_of(kind, key, record), message, 500)
    forget(runtime, kind, key)
    return templates.TemplateResponse(
        request,
        "filed.html",
        {"label": filed.label, "photo_id": filed.photo_id, "not_an_item": NOT_AN_ITEM},
    )


def item_of(kind: str, key: str, record: PhotoRecord) -> Item:
    """The card of a photo that could not be filed, shown again with the error."""
    return Item(
        kind, key, record.taken_at, record.trigger, record.model_version, record.guesses, True
    )


def forget(runtime: BinRuntime, kind: str, key: str) -> None:
    """Take a filed photo off the page: out of the unsure store, or out of the recent ring."""
    store = runtime.pipeline.unsure_store
    if kind == "unsure" and store is not None:
        path = store.find(key)
        if path is not None:
            store.take(path)
    elif kind == "recent" and runtime.recent is not None:
        runtime.recent.remove(key)


def card(request: Request, runtime: BinRuntime, item: Item, error: str, status: int) -> Response:
    return templates.TemplateResponse(
        request,
        "card.html",
        {
            "item": item,
            "labels": model_labels(runtime),
            "shortcuts": SHORTCUT_LABELS,
            "error": error,
        },
        status_code=status,
    )


# The camera and the export.


@router.get("/camera.jpg")
def camera(request: Request) -> Response:
    """The camera's latest frame, small; 404 without a camera, 503 while it is down."""
    capture = _runtime(request).capture
    if capture is None:
        raise HTTPException(404, "this bin has no camera: add a camera: section to its config")
    frame = capture.feed.frame_after(0.0, 1.0)  # the latest frame, whenever it was taken
    if frame is None:
        raise HTTPException(503, f"the camera is down: {capture.feed.last_error}")
    image = frame.image.copy()
    image.thumbnail((CAMERA_VIEW_WIDTH, CAMERA_VIEW_WIDTH))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return Response(
        buffer.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "no-store"}
    )


@router.get("/export.zip")
def export_zip(request: Request) -> StreamingResponse:
    """Every labelled photo and its sidecar, laid out as smartbin-collect writes them."""
    config = _config(request)
    spool = tempfile.SpooledTemporaryFile(max_size=32 * 2**20)  # noqa: SIM115 (streamed)
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED) as archive:
        for filed in labelled_store(_runtime(request)).photos():
            name = f"{filed.label}/{filed.bin_id}_{filed.photo_id}"
            try:
                archive.write(filed.path, f"{name}.jpg")
                archive.write(filed.path.with_suffix(".json"), f"{name}.json")
            except OSError as err:  # refiled meanwhile: the next export has it
                logger.info("export skips %s: %s", filed.photo_id, err)
    spool.seek(0)
    filename = f"smartbin-{config.bin_id}-labelled.zip"
    return StreamingResponse(
        chunks(spool),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def chunks(spool: tempfile.SpooledTemporaryFile[bytes]) -> Iterator[bytes]:
    with spool:
        while block := spool.read(2**20):
            yield block
