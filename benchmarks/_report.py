"""Small helpers every benchmark shares: timing, the environment record, a text table, JSON and a
bar plot. Benchmarks report ratios measured in the same run; these helpers only format them."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Run `fn` `repeats` times; return (fastest wall seconds, result of the last run)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: time at least one run")
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def environment() -> dict[str, Any]:
    """Where the numbers were measured: enough to tell two result files apart."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for module in ("numpy", "numba", "torch", "jax", "mctx"):
        mod = sys.modules.get(module)
        if mod is not None:
            env[module] = getattr(mod, "__version__", "?")
    if "torch" in sys.modules:  # the vector width of torch's kernels: their floats differ across it
        env["torch_cpu_capability"] = sys.modules["torch"].backends.cpu.get_cpu_capability()
    return env


def _cpu_name() -> str:
    # as `mcts.embedded.built_on` reads it; this light module does not import torch (the tree core)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table. columns: (key, header, format spec such as ',.0f' or 's');
    a missing or None value prints as '-', a string value prints as is."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif isinstance(value, str):
                line.append(value)
            else:
                line.append(format(value, spec))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus an `environment` entry if it has none) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "environment": payload.get("environment") or environment()}
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def bar_plot(
    path: str | os.PathLike,
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    ylabel: str,
    title: str,
    log: bool = True,
    annotate: Sequence[str] | None = None,
    line: float | None = None,
) -> Path:
    """Grouped bars, one group per label and one bar per series (None: no bar); `annotate`
    puts one text per group above it (for example the speedup); `line` draws a dashed reference
    (a goal) across. Uses the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2) + 2.5, 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v]
        ys = [v for v in values if v]
        ax.bar(xs, ys, width, label=name)
    if annotate:
        tops = [max((s[j] or 0) for s in series.values()) for j in range(len(labels))]
        for j, text in enumerate(annotate):
            if text and tops[j] > 0:
                ax.annotate(text, (j, tops[j]), ha="center", va="bottom", fontsize=9)
    if line is not None:
        ax.axhline(line, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
