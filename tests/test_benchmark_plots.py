"""Every benchmark that writes JSON also draws its plot from it: each `plot` on a result the
benchmark wrote (docs/results), checked to be a PNG with its first two series' bars in it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.mark.parametrize(
    "module, result",
    [
        ("throughput", "throughput-2026-12-06-xeon-lean.json"),
        ("scaling", "scaling-2026-12-06-xeon.json"),
        ("memory", "memory-2026-12-04.json"),
        ("improve", "improve-2026-12-05.json"),
    ],
)
def test_benchmark_plot_from_its_json(module, result, tmp_path):
    import importlib

    plot = importlib.import_module(f"benchmarks.{module}").plot
    out = plot(json.loads((RESULTS / result).read_text()), tmp_path / f"{module}.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out)[..., :3].reshape(-1, 3)
    for colour in ("C0", "C1"):  # the bars of the first two series, filled in matplotlib's cycle
        rgb = matplotlib.colors.to_rgb(colour)
        assert (abs(pixels - rgb).max(axis=1) < 0.01).sum() > 500, f"no {colour} bars in {out.name}"
