"""The harder shift suite (converter/shift_suite.py) and the calibration fitted on it
(converter/calibrate.py): each shift does to the photo what it says, always the same way."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import PHOTOS
from PIL import Image, ImageFilter

from converter.calibrate import choose_threshold, fit_temperature, nll, sure_figures
from converter.shift_suite import (
    FLOORS,
    HARDER_SHIFTS,
    TEXTURE_SHIFT,
    WHITE_BALANCES,
    Cutout,
    all_shifted,
    composite,
    cut_out,
    harder_shifted,
    item_mask,
    load_textures,
    make_floor,
    on_random_floor,
    shift_rng,
    suite,
)
from smartbin.bundle import load_bundle
from smartbin.model import softmax


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def board_photo(
    transparent: bool = False, size: tuple[int, int] = (320, 240)
) -> tuple[Image.Image, np.ndarray]:
    """A TrashNet-like photo: an unevenly lit grey-white board, an item (a red ellipse, or for
    ``transparent`` a thin dark outline of one, as glass shows) and its soft shadow; with the
    item's true mask."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 215 - 40 * ((xx / width - 0.4) ** 2 + (yy / height - 0.5) ** 2)
    photo = np.repeat(light[..., None], 3, axis=2) * np.array([1.0, 0.98, 0.95])

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        distance: np.ndarray = ((xx - cx * width) / (rx * width)) ** 2 + (
            (yy - cy * height) / (ry * height)
        ) ** 2
        return distance

    inside = ellipse(0.5, 0.5, 0.22, 0.3)
    item = inside <= 1
    shadow = Image.fromarray((ellipse(0.53, 0.56, 0.24, 0.32) <= 1).astype(np.uint8) * 255)
    soft = np.asarray(shadow.filter(ImageFilter.GaussianBlur(8)), np.float32) / 255
    photo *= (1 - 0.2 * soft)[..., None]
    if transparent:
        photo[(inside > 0.85) & item] = (90, 95, 100)
    else:
        photo[item] = (180, 40, 30) + 20 * np.sin(xx[item] / 7)[..., None]
    return Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)), item


@pytest.fixture(scope="module")
def photo_bytes() -> list[bytes]:
    """Real TrashNet photos, two of each category, some with their item found."""
    return [
        p.read_bytes()
        for folder in sorted(d for d in PHOTOS.iterdir() if d.is_dir())
        for p in sorted(folder.glob("*.jpg"))[2:4]
    ]


@pytest.mark.parametrize("transparent", [False, True])
def test_the_item_is_cut_from_an_uneven_board_without_its_shadow(transparent: bool) -> None:
    image, truth = board_photo(transparent)
    cut = cut_out(image)
    assert cut.found
    item = cut.alpha > 0.5
    overlap = (item & truth).sum() / (item | truth).sum()
    assert overlap > 0.88, overlap


def test_a_photo_that_is_all_item_has_no_board() -> None:
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 200, (120, 160, 3)).astype(np.uint8)  # no board anywhere
    assert not cut_out(Image.fromarray(texture)).found
    _, found = item_mask(Image.new("RGB", (160, 120), (210, 210, 205)))  # a bare board
    assert not found


def test_a_composite_keeps_the_items_pixels_and_replaces_the_board() -> None:
    image, truth = board_photo()
    cut = cut_out(image)
    original = np.asarray(image, dtype=np.float32)
    for kind in FLOORS:
        floor = make_floor(kind, np.random.default_rng(1), *cut.size)
        out = composite(cut, floor).astype(np.float32)
        core = cut.alpha == 1
        assert core.sum() > 0.8 * truth.sum()
        np.testing.assert_array_equal(out[core], original[core])
        # Away from the item and its shadow, the board is gone and the floor shows.
        corner = np.zeros_like(truth)
        corner[: image.height // 8, : image.width // 8] = True  # far from the item
        np.testing.assert_allclose(out[corner], np.round(floor[corner]), atol=1)
        if kind in ("wood", "dark_plastic", "cluttered_bin"):
            assert np.abs(out[corner] - original[corner]).mean() > 40, kind


def test_smaller_and_further_away_the_item_covers_a_quarter_of_its_area() -> None:
    image, _ = board_photo()
    cut = cut_out(image)
    width, height = cut.size
    centre = (0.25 * width, 0.7 * height)
    on_black = composite(cut, np.zeros((height, width, 3), np.float32), 0.5, centre)
    on_white = composite(cut, np.full((height, width, 3), 255.0, np.float32), 0.5, centre)
    item = np.all(on_black == on_white, axis=-1)  # only the item is the same on both floors
    assert item.sum() == pytest.approx(0.25 * (cut.alpha == 1).sum(), rel=0.15)
    ys, xs = np.nonzero(item)
    assert xs.mean() == pytest.approx(centre[0], abs=3) and ys.mean() == pytest.approx(
        centre[1], abs=3
    )


def test_the_suite_is_deterministic_and_each_photo_gets_its_own_floor(
    photo_bytes: list[bytes],
) -> None:
    first, again = all_shifted(photo_bytes[0]), all_shifted(photo_bytes[0])
    assert list(first) == list(HARDER_SHIFTS)
    assert first == again
    assert harder_shifted(photo_bytes[0], "wood_floor") == first["wood_floor"]
    other = all_shifted(photo_bytes[1])
    assert all(first[name] != other[name] for name in HARDER_SHIFTS)
    assert len(set(first.values())) == len(first)  # every shift makes a different picture


def found_cut(photo_bytes: list[bytes]) -> tuple[bytes, Cutout]:
    for data in photo_bytes:
        with Image.open(io.BytesIO(data)) as image:
            cut = cut_out(image)
        if cut.found:
            return data, cut
    raise AssertionError("no item found on any photo")


def test_each_shift_does_what_it_says(photo_bytes: list[bytes]) -> None:
    data, cut = found_cut(photo_bytes)
    shifts = suite()

    def before(name: str) -> np.ndarray:
        """The photo on the floor the shift drew, before its own change."""
        return on_random_floor(cut, shift_rng(data, name)).astype(np.float32)

    def after(name: str) -> np.ndarray:
        return shifts[name](cut, shift_rng(data, name)).astype(np.float32)

    # Another white balance: the channels are scaled apart.
    ratio = (after("white_balance") + 1).mean(axis=(0, 1)) / (before("white_balance") + 1).mean(
        axis=(0, 1)
    )
    assert ratio.max() / ratio.min() > 1.15
    assert min(max(g) / min(g) for g in WHITE_BALANCES.values()) > 1.2
    # JPEG at quality 10 loses far more than the suite's own quality 92.
    base = before("jpeg_low_quality")
    low = np.abs(after("jpeg_low_quality") - base).mean()
    high = np.abs(decode(_jpeg(base, 92)) - base).mean()
    assert low > 2 * high
    # Motion blur smooths edges along its direction: the picture's gradients shrink.
    blurred, sharp = after("motion_blur"), before("motion_blur")
    assert _edge_energy(blurred) < 0.8 * _edge_energy(sharp)
    # A hand covers part of the item, in a skin colour.
    covered = np.abs(after("occluded") - before("occluded")).sum(axis=-1) > 30
    item = cut.alpha > 0.5
    share = (covered & item).sum() / item.sum()
    assert 0.05 < share < 0.6, share
    skin = after("occluded")[covered].mean(axis=0)
    assert skin[0] > skin[1] > skin[2]  # red above green above blue


def test_floor_shifts_put_the_item_on_their_floor(photo_bytes: list[bytes]) -> None:
    data, cut = found_cut(photo_bytes)
    for name, kind in (("wood_floor", "wood"), ("cluttered_bin", "cluttered_bin")):
        out = suite()[name](cut, shift_rng(data, name))
        expected = composite(cut, make_floor(kind, shift_rng(data, name), *cut.size))
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out[cut.alpha == 1], cut.image[cut.alpha == 1])


def test_textures_come_from_an_archive_and_leave_the_maps_out(
    tmp_path: Path, photo_bytes: list[bytes]
) -> None:
    archive = tmp_path / "textures.pk3"
    with zipfile.ZipFile(archive, "w") as pk3:
        maps = (("floor_wood01.png", (120, 70, 30)), ("floor_wood01_nm.png", (128, 128, 255)))
        for name, colour in maps:
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), colour).save(buffer, "PNG")
            pk3.writestr(f"textures/tex_buildings/{name}", buffer.getvalue())
        pk3.writestr("textures/tex_buildings/readme.txt", "not a texture")
    textures = load_textures(archive)
    assert textures is not None and textures.names == ["textures/tex_buildings/floor_wood01.png"]
    shifts = suite(textures)
    assert list(shifts) == [*HARDER_SHIFTS, TEXTURE_SHIFT]
    data, cut = found_cut(photo_bytes)
    out = decode(harder_shifted(data, TEXTURE_SHIFT, textures))
    floor = out[cut.alpha == 0].mean(axis=0)
    assert floor[0] > floor[2] + 30  # the brown texture, not the normal map's blue
    assert harder_shifted(data, TEXTURE_SHIFT, textures) == harder_shifted(
        data, TEXTURE_SHIFT, textures
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no floor"):
        load_textures(empty)


def _jpeg(photo: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _edge_energy(photo: np.ndarray) -> float:
    grey = photo.mean(axis=-1)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


# Calibration.


def test_the_fitted_temperature_is_the_one_the_answers_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6000, 6))
    for true_temperature in (0.5, 2.0):
        probs = softmax(logits, true_temperature)
        targets = np.array([rng.choice(6, p=p / p.sum()) for p in probs.astype(np.float64)])
        fitted = fit_temperature(logits, targets)
        assert fitted == pytest.approx(true_temperature, rel=0.1)
        assert nll(logits, targets, fitted) <= nll(logits, targets, 1.0)


def test_the_threshold_keeps_the_most_answers_sure_that_are_right_often_enough() -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 6, 2000)
    logits = rng.normal(0, 1, (2000, 6))
    logits[np.arange(2000), targets] += rng.uniform(0, 4, 2000)
    probs = softmax(logits)
    threshold = choose_threshold(probs, targets, 0.95)
    figures = sure_figures(probs, targets, threshold)
    assert figures["sure_accuracy"] >= 0.95
    assert 0.05 < figures["sure_share"] < 1.0
    # Any lower threshold lets in too many wrong answers.
    best = probs.max(axis=1)
    for lower in np.unique(best[best < threshold])[-50:]:
        assert sure_figures(probs, targets, float(lower))["sure_accuracy"] < 0.95
    # Nothing reaches the target: every answer is unsure.
    assert choose_threshold(probs, (probs.argmax(1) + 1) % 6, 0.95) == 1.0


def test_a_converted_bundle_is_calibrated_and_measured_on_the_harder_suite(
    tiny_bundle: Path,
) -> None:
    bundle = load_bundle(tiny_bundle)
    calibration = bundle.manifest.calibration
    assert calibration is not None and calibration.temperature > 0
    assert bundle.temperature == calibration.temperature
    report = json.loads((tiny_bundle / "report.json").read_text())
    harder = report["int8_test_harder_shifts"]
    assert list(harder) == [*HARDER_SHIFTS, "mean"]
    assert harder["mean"] == pytest.approx(np.mean([harder[n] for n in HARDER_SHIFTS]))
    assert report["calibration"]["unsure_below"] == calibration.unsure_below
    metrics = bundle.manifest.metrics
    assert metrics["int8"]["test_harder_shifts"] == harder
    assert set(metrics["calibration"]["ece_after"]) >= {"val", "test", "test_harder_shifts"}
