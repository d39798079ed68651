"""`make demo`'s command: it classifies the sample photos with the shipped default and shows the
metrics of what it did."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_the_demo_classifies_every_sample_and_shows_only_what_it_counted() -> None:
    samples = sorted((ROOT / "edge_service" / "samples").glob("*.jpg"))
    result = subprocess.run(
        [sys.executable, "-m", "edge_service.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answered = {line.split()[0] for line in result.stdout.splitlines() if ".jpg " in line}
    excerpt = result.stdout.split("(excerpt):", 1)[1].splitlines()
    assert len(samples) == 6
    assert f'smartbin_requests_total{{code="OK",method="Classify"}} {len(samples)}.0' in (
        line.strip() for line in excerpt
    ), result.stdout
    # Series exported from 0 for labels and codes nothing used are left out of the excerpt.
    assert not [line for line in excerpt if line.endswith(" 0.0")]
    assert answered == {path.name for path in samples}
