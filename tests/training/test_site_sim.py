"""The site simulation's report (converter/site_sim.py): runs measured apart, one per site, are
put side by side without measuring anything again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converter.site_sim import main


def _results(path: Path, site: str, site_accuracy: float, side: str | None = None) -> Path:
    rows = [
        {"site": site, "per_label": 0, "float_site": 0.5, "float_trashnet_test": 0.95},
        {
            "site": site,
            "per_label": 25,
            "float_site": site_accuracy,
            "float_trashnet_test": 0.94,
            "int8_site": site_accuracy - 0.01,
            "int8_trashnet_test": 0.93,
        },
    ]
    result: dict[str, object] = {"rows": rows}
    if side is not None:  # results written before the side was recorded have none: test
        result["measured_on"] = side
    path.write_text(json.dumps(result))
    return path


def test_results_of_several_runs_make_one_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wood = _results(tmp_path / "wood.json", "wood-tungsten", 0.875)
    tiles = _results(tmp_path / "tiles.json", "tiles-daylight-far", 0.8125)
    main(["--results", str(wood), str(tiles), "--out", str(tmp_path / "merged")])
    table = capsys.readouterr().out
    assert "| wood-tungsten | 25 | 87.5% | 86.5% | 94.0% | 93.0% |" in table
    assert "| tiles-daylight-far | 0 | 50.0% | not converted | 95.0% | not converted |" in table
    assert "| TrashNet test, float | TrashNet test, int8 |" in table
    assert (tmp_path / "merged" / "site-adaptation.png").stat().st_size > 0


def test_runs_measured_on_val_are_labelled_val(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wood = _results(tmp_path / "wood.json", "wood-tungsten", 0.875, side="val")
    main(["--results", str(wood), "--out", str(tmp_path / "merged")])
    table = capsys.readouterr().out
    assert "| TrashNet val, float | TrashNet val, int8 |" in table
    assert "TrashNet test" not in table


def test_runs_measured_on_different_sides_are_not_put_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wood = _results(tmp_path / "wood.json", "wood-tungsten", 0.875, side="val")
    tiles = _results(tmp_path / "tiles.json", "tiles-daylight-far", 0.8125, side="test")
    with pytest.raises(SystemExit):
        main(["--results", str(wood), str(tiles), "--out", str(tmp_path / "merged")])
    assert "measured on different sides (test, val)" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_measuring_without_the_photos_says_what_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--sites", "wood-tungsten"])
    assert "--data is required" in capsys.readouterr().err
