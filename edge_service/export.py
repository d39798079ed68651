"""ExportLabelled: the photos filed on the review page, streamed off the bin one by one.

Each photo is read from the labelled store and checked against the sha256 its sidecar
recorded before it is sent, so a caller never receives a photo the disk has damaged; the caller
checks the digest again on its side (smartbin-collect).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import grpc

from edge_service.labelled_store import LabelledPhoto, LabelledStore
from edge_service.metrics import ServiceMetrics
from smartbin.v1 import classifier_pb2

logger = logging.getLogger(__name__)


def labelled_photo_pb(photo: LabelledPhoto, image: bytes) -> classifier_pb2.LabelledPhoto:
    return classifier_pb2.LabelledPhoto(
        photo_id=photo.photo_id,
        label=photo.label,
        image=image,
        sha256=photo.sha256,
        taken_at=photo.taken_at,
        labelled_at=photo.labelled_at,
        bin_id=photo.bin_id,
        model_version=photo.model_version,
        guesses=[classifier_pb2.Prediction(label=g.label, score=g.score) for g in photo.guesses],
        trigger=photo.trigger,
    )


def read_checked(photo: LabelledPhoto) -> bytes | None:
    """The photo's bytes when they are what was filed; None (logged) when the file is gone or
    differs from its sidecar's digest."""
    try:
        data = photo.path.read_bytes()
    except OSError as err:  # refiled or removed since the listing
        logger.info("labelled photo %s not exported: %s", photo.photo_id, err)
        return None
    if hashlib.sha256(data).hexdigest() != photo.sha256:
        logger.warning("labelled photo %s not exported: it differs from its sidecar", photo.path)
        return None
    return data


def export_labelled(
    store: LabelledStore | None,
    request: classifier_pb2.ExportLabelledRequest,
    context: grpc.ServicerContext,
) -> Iterator[classifier_pb2.LabelledPhoto]:
    """Yield every filed photo the caller does not have yet, oldest taken first.

    Raises:
        Exception: gRPC's abort, FAILED_PRECONDITION, when the bin keeps no labelled photos.
    """
    if store is None:
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this bin keeps no labelled photos: add a labelled_images: section to its config "
            "and file photos on its review page (web.review)",
        )
    skip = set(request.skip_photo_ids)
    for photo in store.photos():
        if not context.is_active():
            return
        if photo.photo_id in skip:
            continue
        data = read_checked(photo)
        if data is not None:
            yield labelled_photo_pb(photo, data)


def serve_export(
    store: LabelledStore | None,
    metrics: ServiceMetrics,
    request: classifier_pb2.ExportLabelledRequest,
    context: grpc.ServicerContext,
) -> Iterator[classifier_pb2.LabelledPhoto]:
    """:func:`export_labelled`, counted in ``smartbin_requests_total`` by its final code."""
    code = grpc.StatusCode.OK
    try:
        yield from export_labelled(store, request, context)
    except Exception:
        # grpcio has had ServicerContext.code() since 1.38; types-grpcio lacks it.
        code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
        raise
    except GeneratorExit:  # the caller left mid-stream
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        metrics.requests.labels("ExportLabelled", code.name).inc()
