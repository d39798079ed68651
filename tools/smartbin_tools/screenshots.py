"""Screenshots of the review page for the docs (docs/assets/review-*.png).

``python -m smartbin_tools.screenshots`` starts a bin with its review page on, a replay camera
and a folder of photos, classifies the photos, and photographs the page in Debian's headless
chromium (the browser the page's tests drive) before and after an operator files two photos.
Run it from the checkout after changing the page; it downloads nothing.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import yaml

from smartbin.v1 import classifier_pb2, classifier_pb2_grpc
from smartbin_tools.paths import DEFAULT_BUNDLE_DIR, REPOSITORY, SAMPLES_DIR
from smartbin_tools.service import serve_args, spawn_service

ASSETS = REPOSITORY / "docs" / "assets"
PHOTOS = REPOSITORY / "tests" / "data" / "photos"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bin_config(folder: Path, web_port: int, threshold: float) -> Path:
    """A bin keeping unsure photos, with its review page on ``web_port`` and a replay camera
    showing the sample photos."""
    config = folder / "bin.yaml"
    settings = {
        "bin_id": "bin-demo-1",
        "confidence_threshold": threshold,
        "unsure_images": {"folder": str(folder / "unsure")},
        "labelled_images": {"folder": str(folder / "labelled")},
        "camera": {"type": "replay", "folder": str(SAMPLES_DIR), "frame_interval_seconds": 1.0},
        "web": {"enabled": True, "port": web_port, "review": True},
        "metrics_host": "127.0.0.1",
    }
    config.write_text(yaml.safe_dump(settings))
    return config


@contextmanager
def chromium(width: int, height: int) -> Iterator[Any]:
    from selenium import webdriver  # a test and docs dependency, not the tools'

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--hide-scrollbars"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()


def classify_photos(target: str, photos: list[Path]) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        for path in photos:
            stub.Classify(classifier_pb2.ClassifyRequest(image=path.read_bytes()), timeout=30)
        stub.Capture(classifier_pb2.CaptureRequest(), timeout=30)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the page did not get there in time")
        time.sleep(0.05)


def photograph(url: str, out: Path, width: int, height: int) -> list[Path]:
    """review-page.png (the page as the operator finds it, the camera's live view beside the
    counts) and review-filed.png (two photos filed: one by a click, one by a key); returns the
    files."""
    from selenium.webdriver.common.action_chains import ActionChains

    written = [out / "review-page.png", out / "review-filed.png"]
    with chromium(width, height) as driver:
        driver.get(url)
        camera = driver.find_element("id", "camera")
        wait_until(lambda: driver.execute_script("return arguments[0].naturalWidth", camera) > 0)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(written[0]))
        cards = driver.find_elements("css selector", "#unsure .card[data-key]")
        cards[0].find_element("css selector", "button[data-shortcut='2']").click()
        wait_until(lambda: len(driver.find_elements("css selector", ".card.filed")) == 1)
        ActionChains(driver).send_keys("1").perform()
        wait_until(lambda: len(driver.find_elements("css selector", ".card.filed")) == 2)
        driver.execute_script("document.getElementById('unsure').scrollIntoView()")
        driver.save_screenshot(str(written[1]))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the PNG files")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument(
        "--threshold", type=float, default=0.8, help="unsure below this score (more cards)"
    )
    args = parser.parse_args(argv)
    photos = sorted(PHOTOS.glob("*/*.jpg"))[::6]
    with tempfile.TemporaryDirectory() as tmp:
        web_port = free_port()
        config = bin_config(Path(tmp), web_port, args.threshold)
        with spawn_service(serve_args(DEFAULT_BUNDLE_DIR, config)) as service:
            classify_photos(service.target, photos)
            url = f"http://127.0.0.1:{web_port}/review"
            for path in photograph(url, args.out, args.width, args.height):
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
