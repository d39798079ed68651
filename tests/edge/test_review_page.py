"""The review page, end to end: a real bin with its web port and review page on, driven by a
real headless browser (Debian's chromium through its chromedriver): the operator sees the
unsure photos and the last answers with the model's guesses, files them with a click, a key, a
new category or "not an item", aims the camera, and nobody without the password gets in."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import ssl
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from helpers import PHOTOS, Authority, local_config, wait_for
from pydantic import ValidationError

from edge_service.config import LabelledImagesConfig, ServiceConfig
from edge_service.labelled_store import (
    NOT_AN_ITEM,
    LabelError,
    LabelledStore,
    check_label,
    normalise_new_label,
)
from edge_service.recent import PhotoRecord, photo_id_for
from edge_service.server import create_server
from smartbin.bundle import Bundle
from smartbin.v1 import classifier_pb2, classifier_pb2_grpc

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FAST_CAMERA = {"frame_interval_seconds": 0.1, "retry_min_seconds": 0.05, "retry_max_seconds": 0.2}


def browser_or_skip() -> None:
    """The test needs Debian's chromium and chromedriver (.ci/apt-packages): CI must have them;
    elsewhere their absence skips it."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
    if os.environ.get("CI"):
        pytest.fail(f"CI installs the packages of .ci/apt-packages, but {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    browser_or_skip()
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def review_config(tmp_path: Path, bundle: Path, **overrides: object) -> ServiceConfig:
    """A bin that finds every answer unsure (so it keeps every photo), with its review page on
    a free loopback port."""
    settings: dict[str, object] = {
        "web": {"enabled": True, "port": 0, "review": True},
        "unsure_images": {"folder": tmp_path / "unsure"},
        "labelled_images": {"folder": tmp_path / "labelled"},
        "confidence_threshold": 0.999,
        "bin_id": "bin-3",
    }
    settings.update(overrides)
    return local_config(bundle, **settings)


@pytest.fixture
def review_bin(tmp_path: Path, default_bundle: Path) -> Iterator[SimpleNamespace]:
    camera = tmp_path / "camera"
    camera.mkdir()
    for index, path in enumerate(sorted(PHOTOS.glob("*/*.jpg"))[:3]):
        shutil.copy(path, camera / f"{index:02d}.jpg")
    config = review_config(
        tmp_path, default_bundle, camera={"type": "replay", "folder": camera, **FAST_CAMERA}
    )
    service = create_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield SimpleNamespace(
            service=service,
            stub=classifier_pb2_grpc.ClassifierStub(channel),
            url=f"http://127.0.0.1:{service.web_port}/review",
            labelled=tmp_path / "labelled",
        )
    finally:
        channel.close()
        service.stop(grace=1)


def classify(stub: classifier_pb2_grpc.ClassifierStub, count: int) -> None:
    for path in sorted(PHOTOS.glob("*/*.jpg"))[:count]:
        stub.Classify(classifier_pb2.ClassifyRequest(image=path.read_bytes()), timeout=30)


def filed(folder: Path) -> dict[str, list[dict]]:
    """The labelled store's sidecars by label; each photo beside its sidecar."""
    found: dict[str, list[dict]] = {}
    for sidecar in sorted(folder.glob("*/*.json")):
        assert sidecar.with_suffix(".jpg").stat().st_size > 0
        found.setdefault(sidecar.parent.name, []).append(json.loads(sidecar.read_text()))
    return found


def cards(driver: Any) -> list:
    return driver.find_elements("css selector", ".card[data-key]")


def filed_labels(driver: Any) -> list[str]:
    found = driver.find_elements("css selector", ".card.filed .filed-label")
    return [element.text for element in found]


def press(driver: Any, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def test_the_operator_files_unsure_photos_by_click_key_new_category_and_not_an_item(
    browser: Any, review_bin: SimpleNamespace, default_loaded: Bundle
) -> None:
    labels = list(default_loaded.labels)
    classify(review_bin.stub, 5)
    driver = browser
    driver.get(review_bin.url)
    assert len(cards(driver)) == 5
    first = cards(driver)[0]
    assert first.find_element("css selector", ".guesses .score").text.endswith("%")
    # A click on a label's button files the photo without reloading the page.
    driver.execute_script("window.notReloaded = true")
    first.find_element("css selector", "button[data-shortcut='2']").click()
    wait_for(lambda: filed_labels(driver) == [labels[1]])
    assert driver.execute_script("return window.notReloaded") is True
    # The next photo has the focus: key 1 files it under the first label.
    wait_for(lambda: driver.switch_to.active_element.get_attribute("data-key") is not None)
    press(driver, "1")
    wait_for(lambda: len(filed_labels(driver)) == 2)
    # A new category typed in the photo's box (made a folder name), then "not an item".
    box = cards(driver)[0].find_element("css selector", "input[name=new_label]")
    box.send_keys("Coffee cups\n")
    wait_for(lambda: len(filed_labels(driver)) == 3)
    wait_for(lambda: driver.switch_to.active_element.get_attribute("data-key") is not None)
    press(driver, "n")
    wait_for(lambda: len(filed_labels(driver)) == 4)
    assert filed_labels(driver) == [labels[1], labels[0], "coffee-cups", "not an item"]
    assert len(cards(driver)) == 1

    store = filed(review_bin.labelled)
    assert sorted(store) == sorted({labels[1], labels[0], "coffee-cups", NOT_AN_ITEM})
    photo = store["coffee-cups"][0]
    assert photo["bin_id"] == "bin-3" and photo["trigger"] == "upload"
    assert photo["model_version"] == default_loaded.version
    assert photo["guesses"][0]["label"] in labels and photo["labelled_at"] >= photo["taken_at"]
    # Filed photos leave the unsure store, and the page no longer offers them.
    assert len(list((review_bin.labelled.parent / "unsure").glob("*.jpg"))) == 1
    driver.get(review_bin.url)
    assert len(cards(driver)) == 1
    counts = driver.find_element("id", "counts").text
    assert "coffee-cups 1" in counts and "not an item 1" in counts


def test_a_name_that_cannot_be_a_folder_is_refused_on_the_card(
    browser: Any, review_bin: SimpleNamespace
) -> None:
    classify(review_bin.stub, 1)
    driver = browser
    driver.get(review_bin.url)
    box = cards(driver)[0].find_element("css selector", "input[name=new_label]")
    box.send_keys("../etc\n")
    wait_for(lambda: driver.find_elements("css selector", ".card .error"))
    error = driver.find_element("css selector", ".card .error").text
    assert "cannot name a folder" in error and "letters, digits" in error
    assert len(cards(driver)) == 1 and filed(review_bin.labelled) == {}


def test_the_recent_answers_and_the_live_camera_are_on_the_page(
    browser: Any, review_bin: SimpleNamespace
) -> None:
    # An answer the bin is sure of is not kept as unsure, but it is among the recent ones.
    review_bin.service.runtime.pipeline.confidence_threshold = 0.0
    review_bin.stub.Capture(classifier_pb2.CaptureRequest(), timeout=30)
    driver = browser
    driver.get(review_bin.url)
    recent = driver.find_elements("css selector", "#recent .card[data-key]")
    assert len(recent) == 1 and "rpc" in recent[0].find_element("css selector", ".meta").text
    assert driver.find_elements("css selector", "#unsure .card[data-key]") == []
    camera = driver.find_element("id", "camera")
    wait_for(lambda: driver.execute_script("return arguments[0].naturalWidth", camera) > 0)
    first = driver.execute_script("return arguments[0].src", camera)
    wait_for(lambda: driver.execute_script("return arguments[0].src", camera) != first, 10)
    press(driver, "n")
    wait_for(lambda: filed_labels(driver) == ["not an item"])
    assert [photo["trigger"] for photo in filed(review_bin.labelled)[NOT_AN_ITEM]] == ["rpc"]


# Who gets in: no browser needed.


def fetch(url: str, context: ssl.SSLContext | None = None, **headers: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"operator:{password}".encode()).decode()


def test_off_the_bin_the_page_needs_the_operators_password_over_tls(
    tmp_path: Path, default_bundle: Path
) -> None:
    authority = Authority(tmp_path, "site-ca")
    server = authority.issue("bin-3", server=True)
    password = tmp_path / "review-password"
    password.write_text("correct horse\n")
    web = {
        "enabled": True,
        "host": "0.0.0.0",
        "port": 0,
        "review": True,
        "tls": {"cert": server.cert, "key": server.key},
        "review_password_file": password,
    }
    service = create_server(review_config(tmp_path, default_bundle, web=web))
    context = ssl.create_default_context(cafile=authority.cert_path)
    url = f"https://localhost:{service.web_port}/review"
    try:
        refused, body = fetch(url, context)
        wrong, _ = fetch(url, context, Authorization=basic("wrong"))
        allowed, page = fetch(url, context, Authorization=basic("correct horse"))
        no_htmx, _ = fetch_post(f"{url}/file/unsure/x.jpg", context, basic("correct horse"))
    finally:
        service.stop(grace=1)
    assert refused == 401 and "review_password_file" in json.loads(body)["error"]
    assert wrong == 401 and allowed == 200 and "smartbin review" in page
    assert no_htmx == 400


def fetch_post(url: str, context: ssl.SSLContext, authorization: str) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=b"label=x", headers={"Authorization": authorization}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_page_open_to_other_machines_must_have_tls_and_the_operators_identity(
    tmp_path: Path, default_bundle: Path
) -> None:
    authority = Authority(tmp_path, "site-ca")
    server = authority.issue("bin-3", server=True)
    open_web = {"enabled": True, "host": "0.0.0.0", "review": True}
    with pytest.raises(ValidationError, match="set web.tls"):
        review_config(tmp_path, default_bundle, web=open_web)
    tls = {"cert": server.cert, "key": server.key}
    with pytest.raises(ValidationError, match="review_password_file or web.tls.client_ca"):
        review_config(tmp_path, default_bundle, web={**open_web, "tls": tls})
    with pytest.raises(ValidationError, match="labelled_images"):
        review_config(tmp_path, default_bundle, labelled_images=None)
    # With client certificates, the certificate is the operator's identity.
    client_ca = {**tls, "client_ca": authority.cert_path}
    assert review_config(tmp_path, default_bundle, web={**open_web, "tls": client_ca}).web.review


# The labelled store on its own: what a crash leaves, and which names are folders.


def test_the_labelled_store_removes_at_start_what_a_crash_left_half_done(tmp_path: Path) -> None:
    config = LabelledImagesConfig(folder=tmp_path / "labelled")
    jpeg = next(PHOTOS.glob("*/*.jpg")).read_bytes()
    record = PhotoRecord(photo_id_for(jpeg, 1.0), jpeg, 1.0, "gpio", "m1", (), True)
    photo = LabelledStore(config, "bin-3").file(record, "some-label")
    # A power cut after the photo was renamed in, before its sidecar; one in mid-write.
    orphan = photo.path.with_name("1790000000000-0123456789.jpg")
    orphan.write_bytes(jpeg)
    partial = photo.path.with_name(".1790000000001-0123456789.jpg.part")
    partial.write_bytes(jpeg[:10])
    reopened = LabelledStore(config, "bin-3")
    assert [p.photo_id for p in reopened.photos()] == [photo.photo_id]
    assert not orphan.exists() and not partial.exists()
    # Filing it again under another label moves it: one photo, one place.
    moved = reopened.file(record, NOT_AN_ITEM)
    assert sorted(p.relative_to(config.folder) for p in config.folder.glob("*/*")) == [
        Path(NOT_AN_ITEM, f"{moved.photo_id}.jpg"),
        Path(NOT_AN_ITEM, f"{moved.photo_id}.json"),
    ]


@pytest.mark.parametrize("name", ["", "../etc", ".hidden", "a/b", "con", "LPT1", "x" * 49, "é"])
def test_a_label_that_cannot_be_a_folder_everywhere_is_refused(name: str) -> None:
    with pytest.raises(LabelError, match="label"):
        check_label(name)


def test_a_typed_category_becomes_a_folder_name() -> None:
    assert normalise_new_label("  Coffee   cups ") == "coffee-cups"
    assert check_label("Plastic_2-x") == "Plastic_2-x"


def test_a_photo_filed_from_another_page_is_reported_gone_on_the_card(
    review_bin: SimpleNamespace,
) -> None:
    classify(review_bin.stub, 1)
    (name,) = [path.name for path in (review_bin.labelled.parent / "unsure").glob("*.jpg")]
    url = f"{review_bin.url}/file/unsure/{name}"

    def file_it() -> tuple[int, str]:
        request = urllib.request.Request(
            url, data=b"not_an_item=1", headers={"HX-Request": "true"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    assert file_it()[0] == 200
    status, card = file_it()  # a second tab, a moment later
    assert status == 404 and "filed or dropped meanwhile" in card and "<article" in card
    assert len(filed(review_bin.labelled)[NOT_AN_ITEM]) == 1


def test_the_page_exports_the_labelled_photos_as_a_zip_of_the_collect_layout(
    review_bin: SimpleNamespace,
) -> None:
    classify(review_bin.stub, 2)
    for name in sorted(p.name for p in (review_bin.labelled.parent / "unsure").glob("*.jpg")):
        request = urllib.request.Request(
            f"{review_bin.url}/file/unsure/{name}",
            data=b"new_label=site-item",
            headers={"HX-Request": "true"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()
    with urllib.request.urlopen(f"{review_bin.url}/export.zip", timeout=10) as answer:
        assert "bin-3" in answer.headers["Content-Disposition"]
        archive = zipfile.ZipFile(io.BytesIO(answer.read()))
    ids = [photo["photo_id"] for photo in filed(review_bin.labelled)["site-item"]]
    assert len(ids) == 2
    names = [f"site-item/bin-3_{photo_id}" for photo_id in ids]
    assert sorted(archive.namelist()) == sorted(f"{n}.{s}" for n in names for s in ("jpg", "json"))
    photo = (review_bin.labelled / "site-item" / f"{ids[0]}.jpg").read_bytes()
    assert archive.read(f"{names[0]}.jpg") == photo


def test_a_fleet_bin_files_its_photos_under_the_name_its_rollouts_know(
    tmp_path: Path, default_bundle: Path
) -> None:
    fleet = {"store_url": "http://127.0.0.1:9/", "bin_id": "hall-4", "bundles_dir": tmp_path}
    assert local_config(default_bundle, fleet=fleet).bin_id == "hall-4"
    with pytest.raises(ValidationError, match="name the same bin differently"):
        local_config(default_bundle, fleet=fleet, bin_id="hall-5")
