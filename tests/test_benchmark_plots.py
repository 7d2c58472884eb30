"""Every benchmark that writes JSON also draws its plot from it: each `plot` on a result the
benchmark wrote (docs/results), checked to be a PNG of the figure's size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

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
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 600 and height >= 400  # bar_plot's figure at 120 dpi, not an empty canvas
