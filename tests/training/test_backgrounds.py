"""Background replacement and strong photometric augmentation (trainer/backgrounds.py): the item
leaves its white board for backdrops of its own kinds, and a run trains with them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import PHOTOS
from PIL import Image
from tiny import TINY_SIZE, tiny_train_args

from converter.shift_suite import FLOORS
from trainer.backgrounds import (
    BACKDROPS,
    BackdropPhotos,
    Cutouts,
    Photometric,
    Placement,
    occlude,
    piece_of,
    random_backdrop,
    replace_background,
)
from trainer.cutout import Cutout
from trainer.data import Sample
from trainer.train import TrainImages, parse_args, run

RED = np.array([190, 40, 30], dtype=np.float32)


def red_item_on_board(width: int = 320, height: int = 240) -> np.ndarray:
    """A red disc on an unevenly lit white board, as TrashNet photographs an item."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 220 - 30 * ((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2)
    photo = np.repeat(light[..., None], 3, axis=2)
    disc = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 <= (0.25 * height) ** 2
    photo[disc] = RED
    return photo.astype(np.uint8)


def reddish(photo: np.ndarray) -> int:
    distance = np.linalg.norm(photo.astype(np.float32) - RED, axis=-1)
    return int((distance < 30).sum())


def test_the_backdrops_are_not_the_floors_the_suite_measures_on() -> None:
    assert not set(BACKDROPS) & set(FLOORS)
    rng = np.random.default_rng(0)
    for _ in range(10):
        backdrop = random_backdrop(rng, 64, 48)
        assert backdrop.shape == (48, 64, 3)
        assert backdrop.min() >= 0 and backdrop.max() <= 255


def test_the_item_keeps_its_pixels_on_a_new_backdrop() -> None:
    photo = red_item_on_board()
    cutouts = Cutouts.of([photo])
    assert cutouts.found == [True]
    board = np.ones(photo.shape[:2], dtype=bool)
    board[30:-30, 30:-30] = False  # the outer ring, where the board was
    for seed in range(8):
        out = replace_background(cutouts.cutout(0, photo), np.random.default_rng(seed))
        assert out.shape == photo.shape and out.dtype == np.uint8
        # Placed at half its size or more: a quarter of its red pixels at least, and more
        # where a backdrop is itself red.
        assert reddish(out) >= 0.25 * 0.9 * reddish(photo)
        assert np.abs(out[board].astype(float) - photo[board]).mean() > 10  # not the board


def test_a_placement_can_put_the_item_further_away_and_partly_covered() -> None:
    photo = red_item_on_board()
    cut = Cutouts.of([photo]).cutout(0, photo)
    red = reddish(photo)
    far = Placement(smallest_scale=0.3)
    sizes = [reddish(replace_background(cut, np.random.default_rng(s), far)) for s in range(12)]
    # Under half its size (a quarter of its area) in some placements, never gone.
    assert min(sizes) < 0.25 * red and min(sizes) > 0.3**2 * 0.8 * red
    covered = Placement(smallest_scale=1.0, occlusion=1.0)
    for seed in range(8):
        out = replace_background(cut, np.random.default_rng(seed), covered)
        assert 0.55 * red < reddish(out) < 0.97 * red  # part of the item hidden, most kept


def test_the_backdrop_can_be_a_piece_of_another_item() -> None:
    photo = red_item_on_board()
    cut = Cutouts.of([photo]).cutout(0, photo)
    # Another item filling its frame (no board found): green with a grain.
    grain = np.random.default_rng(1).integers(-12, 13, (240, 320, 1))
    green = np.clip(np.array([40, 150, 60]) + grain, 0, 255).astype(np.uint8)
    other = Cutout(green, np.ones((240, 320), np.float32), found=False)
    board = np.ones(photo.shape[:2], dtype=bool)
    board[30:-30, 30:-30] = False

    def greenish(out: np.ndarray) -> float:
        distance = np.linalg.norm(out[board].astype(np.float32) - [40, 150, 60], axis=-1)
        return float((distance < 30).mean())

    def placed(seed: int, share: float) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return replace_background(cut, rng, Placement(other_items=share), lambda _: other)

    for seed in range(6):
        out = placed(seed, 1.0)
        assert reddish(out) >= 0.25 * 0.9 * reddish(photo)  # the item is still there
        assert greenish(out) > 0.9  # and around it, the other item
        assert greenish(placed(seed, 0.0)) < 0.5  # a backdrop of the trainer's own
    # A tall photo's backdrop, from a wide one: the window stays inside the other photo.
    tall = red_item_on_board(240, 320)
    tall_cut = Cutouts.of([tall]).cutout(0, tall)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        piece = piece_of(other, rng, *tall_cut.size)
        assert piece.shape == (320, 240, 3)
        assert (piece.sum(axis=-1) < 30).mean() == 0  # no black beyond the other photo


def test_the_backdrop_can_be_a_photo_from_a_folder(tmp_path: Path) -> None:
    # A floor photo of two halves, blue above and grey below, smaller than the frame.
    floor = np.zeros((150, 200, 3), np.uint8)
    floor[:75] = [30, 60, 170]
    floor[75:] = [120, 120, 120]
    (tmp_path / "floors").mkdir()
    Image.fromarray(floor).save(tmp_path / "floors" / "hall.png")
    (tmp_path / "floors" / "notes.txt").write_text("not a photo")
    photos = BackdropPhotos(tmp_path / "floors")
    assert len(photos) == 1
    photo = red_item_on_board()
    cut = Cutouts.of([photo]).cutout(0, photo)
    board = np.ones(photo.shape[:2], dtype=bool)
    board[30:-30, 30:-30] = False

    def from_floor(out: np.ndarray) -> float:
        pixels = out[board].astype(np.float32)
        near = [np.linalg.norm(pixels - c, axis=-1) < 25 for c in ([30, 60, 170], [120] * 3)]
        return float((near[0] | near[1]).mean())

    on_floor = Placement(photos=1.0)
    for seed in range(6):
        out = replace_background(cut, np.random.default_rng(seed), on_floor, photos=photos)
        assert out.shape == photo.shape
        assert reddish(out) >= 0.25 * 0.9 * reddish(photo)  # the item is still there
        assert from_floor(out) > 0.9  # and around it, the floor photo enlarged to the frame
        rng = np.random.default_rng(seed)
        drawn = replace_background(cut, rng, Placement(photos=0.0), photos=photos)
        assert from_floor(drawn) < 0.5  # a share of 0: the trainer's own backdrops


def test_a_folder_without_photos_or_with_a_broken_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no photos"):
        BackdropPhotos(tmp_path)
    whole = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(whole, "JPEG")
    (tmp_path / "floor.jpg").write_bytes(whole.getvalue()[:300])  # cut off in the copy
    with pytest.raises(ValueError, match="floor.jpg is not a readable photo"):
        BackdropPhotos(tmp_path)


def test_an_occluder_covers_the_side_of_the_box_it_reaches_in_from() -> None:
    photo = np.full((200, 200, 3), 128, dtype=np.uint8)
    box = (70.0, 70.0, 130.0, 130.0)
    for seed in range(10):
        changed = np.abs(occlude(photo, box, np.random.default_rng(seed)).astype(float) - 128)
        where = changed.max(axis=-1) > 0
        assert 0.03 < where[70:130, 70:130].mean() < 0.4
        # Centred on a side, it reaches under half the box in: at most its blurred edge
        # touches the middle.
        assert changed[100, 100].max() < 30
        # and it reaches out no further than it reaches in (27 px, under half the box, and blur)
        assert not where[:35].any() and not where[165:].any()
        assert not where[:, :35].any() and not where[:, 165:].any()


def test_reads_with_backgrounds_and_strong_photometric_are_training_inputs() -> None:
    buffer = io.BytesIO()
    Image.fromarray(red_item_on_board()).save(buffer, "PNG")
    sample = Sample("red/disc.png", 0, buffer.getvalue())
    torch.manual_seed(0)
    images = TrainImages([sample] * 4, TINY_SIZE, backgrounds=1.0, photometric="strong")
    for index in range(4):
        pixels, label = images[index]
        assert pixels.shape == (3, TINY_SIZE, TINY_SIZE) and pixels.dtype == torch.float32
        assert label == 0
    plain = TrainImages([sample], TINY_SIZE)
    assert plain.cutouts is None and plain.photometric is None  # off unless asked for


def test_strong_photometric_steps_change_the_photo_and_none_leaves_it() -> None:
    photo = red_item_on_board(96, 72)
    rng = np.random.default_rng(0)
    every = Photometric(1.0, 1.0, 1.0, 1.0, 1.0)(photo, rng)
    assert every.shape == photo.shape and every.dtype == np.uint8
    assert np.abs(every.astype(float) - photo).mean() > 3
    none = Photometric(0.0, 0.0, 0.0, 0.0, 0.0)(photo, rng)
    assert np.array_equal(none, photo)


@pytest.mark.parametrize("freeze", [True, False])
def test_a_run_trains_on_backdrops_and_frozen_batch_norm_keeps_its_statistics(
    tmp_path: Path, freeze: bool
) -> None:
    floors = tmp_path / "floors"
    floors.mkdir()
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(floors / "floor.png")
    extra = ["--backgrounds", "0.8", "--other-items", "0.5", "--photometric", "strong"]
    extra += ["--backdrop-photos", str(floors), "--ema-decay", "0"]
    if freeze:
        extra.append("--freeze-batchnorm")
    config = parse_args(tiny_train_args(PHOTOS, tmp_path, "run", *extra))
    checkpoint = torch.load(run(config), map_location="cpu", weights_only=True)
    recorded = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())
    assert recorded["backgrounds"] == 0.8 and recorded["photometric"] == "strong"
    assert recorded["other_items"] == 0.5 and recorded["backdrop_photos"] == str(floors)
    # A fresh model's batch norm starts at mean 0: frozen, it stays there.
    means = [v for k, v in checkpoint["state_dict"].items() if k.endswith("running_mean")]
    moved = max(float(m.abs().max()) for m in means)
    assert (moved == 0.0) == freeze


def test_a_share_of_backgrounds_outside_0_to_1_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(tiny_train_args(PHOTOS, tmp_path, "run", "--backgrounds", "1.5"))


def test_backdrop_photos_must_be_a_folder_of_photos_and_need_backgrounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(SystemExit):
        parse_args(
            tiny_train_args(
                PHOTOS, tmp_path, "run", "--backgrounds", "0.5", "--backdrop-photos", missing
            )
        )
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        parse_args(
            tiny_train_args(
                PHOTOS, tmp_path, "run", "--backgrounds", "0.5", "--backdrop-photos", str(empty)
            )
        )
    assert "holds no photos" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(tiny_train_args(PHOTOS, tmp_path, "run", "--backdrop-photos", str(PHOTOS)))
    assert "give --backgrounds too" in capsys.readouterr().err
