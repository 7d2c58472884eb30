"""`arborist show OUT [--problem ID] [--html PATH]`: one self-contained HTML page of a finished job.

It draws one finished tree (by default the first with the most pairs) as an SVG: every node's step,
visits N, Q = W / N, verified success S / V over trials, critic scores; the best verified path
highlighted; the pairs derived at each node, chosen and rejected marked. Below it, the job's
summary plots: success rate per problem, pairs per problem, and the critics' calibration on the
job's nodes. Nothing is fetched: styles, script and plots are inline, so the file opens offline.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from critics.metrics import read_json_object
from mcts.finished import FinishedTree
from rewards.export import load_manifest, read_rows
from rewards.stats import node_stats

DX, DY, PAD = 34, 74, 40  # leaf spacing, level spacing, margin (px)


class ShowInputError(ValueError):
    """An output directory `arborist show` cannot draw; one line saying what to do."""


# -- reading --------------------------------------------------------------------------------------------
def load(out: str | Path) -> tuple[list[FinishedTree], list[dict], dict]:
    """(trees, pairs, audit) of an `arborist search` output directory."""
    out = Path(out)
    path = out / "manifest.json"
    if not path.is_file():
        raise ShowInputError(f"{out} has no manifest.json: pass the out= directory of `arborist search`")
    try:
        manifest = load_manifest(out)  # the shard log of a running or killed job included
        trees = [FinishedTree.from_row(r) for r in read_rows(out, manifest, "trees")]
        pairs = read_rows(out, manifest, "pairs")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ShowInputError(
            f"{out} is not a readable arborist dataset ({e}): rerun `arborist search`"
        ) from None
    if not trees:
        raise ShowInputError(f"{out} holds no finished tree yet: let `arborist search` finish a batch")
    audit = read_json_object(out / "audit.json", ShowInputError, "rerun `arborist search` to rewrite it")
    return trees, pairs, audit


# -- the tree -------------------------------------------------------------------------------------------
def layout(tree: FinishedTree) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) per node: leaves left to right in depth-first order, a parent centred over its children."""
    n = tree.num_nodes
    kids = [[] for _ in range(n)]
    for i in range(1, n):
        kids[int(tree.nodes["parent"][i])].append(i)
    x = np.zeros(n)
    next_leaf = 0.0
    stack = [(0, False)]
    while stack:  # iterative post-order: deep trees do not hit the recursion limit
        node, done = stack.pop()
        if done or not kids[node]:
            if kids[node]:
                x[node] = (x[kids[node][0]] + x[kids[node][-1]]) / 2
            else:
                x[node], next_leaf = next_leaf, next_leaf + 1
            continue
        stack.append((node, True))
        stack += [(c, False) for c in reversed(kids[node])]
    y = tree.nodes["depth"].astype(float)
    return PAD + x * DX, PAD + y * DY


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3g}"


def tree_svg(tree: FinishedTree, pairs: list[dict]) -> str:
    st = node_stats(tree)
    x, y = layout(tree)
    best = set(tree.path(int(st.best_verified[0]))) if st.best_verified[0] > 0 else set()
    chosen = Counter(p["chosen_node"] for p in pairs)
    rejected = Counter(p["rejected_node"] for p in pairs)
    width, height = float(x.max()) + PAD + 160, float(y.max()) + PAD + 30
    parts = [f'<svg id="tree" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}">']
    for i in range(1, tree.num_nodes):
        p = int(tree.nodes["parent"][i])
        cls = "edge best" if i in best else "edge"
        parts.append(f'<line class="{cls}" x1="{x[p]:.1f}" y1="{y[p]:.1f}" x2="{x[i]:.1f}" y2="{y[i]:.1f}"/>')
    q = st.q
    for i in range(tree.num_nodes):
        outcome = int(st.outcome[i])
        kind = "correct" if outcome == 1 else "wrong" if outcome == 0 else "open"
        mark = " chosen" if chosen[i] else ""
        mark += " rejected" if rejected[i] else ""
        mark += " best" if i in best else ""
        info = {
            "node": i,
            "step": tree.steps[i] or "(prompt)",
            "N": int(st.visits[i]),
            "Q": _fmt(float(q[i])),
            "S/V": f"{int(st.successes[i])}/{int(st.trials[i])}",
            "value": _fmt(float(tree.nodes["value"][i])),
            "PRM": _fmt(float(tree.nodes["prm"][i])),
            "ORM": _fmt(float(tree.nodes["orm"][i])),
            "terminal": bool(st.terminal[i]),
            "verified": {1: "correct", 0: "wrong"}.get(outcome, "–"),
            "chosen in pairs": chosen[i],
            "rejected in pairs": rejected[i],
        }
        radius = 5 + min(9.0, 2.0 * np.log1p(st.visits[i]))
        label = html.escape(tree.steps[i][:18]) if i else "root"
        parts.append(
            f'<g class="node {kind}{mark}" data-node="{i}" data-info="{html.escape(json.dumps(info))}">'
            f'<circle cx="{x[i]:.1f}" cy="{y[i]:.1f}" r="{radius:.1f}"/>'
            f'<text x="{x[i]:.1f}" y="{y[i] + radius + 12:.1f}">{label}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


# -- summary plots --------------------------------------------------------------------------------------
def bar_chart(title: str, labels: list[str], values: list[float], ylabel: str) -> str:
    w, h, left, bottom = 360, 200, 40, 30
    top = max(values, default=0) or 1
    bw = (w - left - 10) / max(1, len(values))
    bars = []
    for k, (lab, v) in enumerate(zip(labels, values, strict=True)):
        bh = (h - bottom - 20) * v / top
        bx = left + k * bw
        bars.append(
            f'<rect x="{bx + 2:.1f}" y="{h - bottom - bh:.1f}" width="{bw - 4:.1f}" height="{bh:.1f}">'
            f"<title>{html.escape(lab)}: {v:.3g}</title></rect>"
            f'<text class="tick" x="{bx + bw / 2:.1f}" y="{h - bottom + 14}">{html.escape(lab)}</text>'
        )
    return (
        f'<figure><svg class="plot" width="{w}" height="{h}"><text class="title" x="{left}" y="12">'
        f'{html.escape(title)}</text><text class="tick" x="4" y="{h / 2:.0f}">{html.escape(ylabel)}</text>'
        + "".join(bars)
        + "</svg></figure>"
    )


def calibration_chart(trees: list[FinishedTree], critic: str) -> str:
    """Mean verified success rate (S / V) per bin of the critic's score, on nodes with >= 2 trials."""
    scores, rates = [], []
    for t in trees:
        s, v = t.evidence()
        ok = (v >= 2) & ~np.isnan(t.nodes[critic]) & ~t.nodes["terminal"]
        scores.append(t.nodes[critic][ok])
        rates.append(s[ok] / v[ok])
    sc, rt = np.concatenate(scores), np.concatenate(rates)
    if not len(sc):
        return f"<figure><p>{critic}: no scored node with two trials or more</p></figure>"
    bins = np.clip((sc * 5).astype(int), 0, 4)
    labels = [f"{b / 5:.1f}-{(b + 1) / 5:.1f}" for b in range(5)]
    means = [float(rt[bins == b].mean()) if (bins == b).any() else 0.0 for b in range(5)]
    return bar_chart(f"{critic} score -> verified success (n={len(sc)})", labels, means, "S/V")


def summary_plots(trees: list[FinishedTree], pairs: list[dict]) -> str:
    root_rate = [float(t.success_rate()[0]) for t in trees]
    rate_bins = Counter(min(4, int(r * 5)) if not np.isnan(r) else -1 for r in root_rate)
    rate_labels = ["none"] + [f"{b / 5:.1f}-{(b + 1) / 5:.1f}" for b in range(5)]
    per_problem = Counter(p["problem_id"] for p in pairs)
    counts = Counter(min(per_problem.get(t.problem_id, 0), 5) for t in trees)
    return (
        bar_chart(
            "problems by root success rate (S/V)",
            rate_labels,
            [rate_bins.get(b, 0) for b in [-1, 0, 1, 2, 3, 4]],
            "problems",
        )
        + bar_chart(
            "pairs per problem",
            [str(k) if k < 5 else "5+" for k in range(6)],
            [counts.get(k, 0) for k in range(6)],
            "problems",
        )
        + calibration_chart(trees, "value")
        + calibration_chart(trees, "prm")
    )


# -- the page -------------------------------------------------------------------------------------------
STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
.edge{stroke:#bbb;stroke-width:1.2}.edge.best{stroke:#1a7f37;stroke-width:4}
.node circle{fill:#ddd;stroke:#666;stroke-width:1;cursor:pointer}
.node.correct circle{fill:#2da44e}.node.wrong circle{fill:#cf222e}
.node.chosen circle{stroke:#1a7f37;stroke-width:3}.node.rejected circle{stroke:#cf222e;stroke-width:3;stroke-dasharray:3 2}
.node text{font-size:9px;text-anchor:middle;fill:#444}
#treebox{overflow:auto;border:1px solid #ddd;max-height:70vh}
#details{font-family:monospace;white-space:pre;background:#f6f8fa;padding:8px;min-height:5em}
.plot rect{fill:#4a7ab0}.plot .tick{font-size:9px;text-anchor:middle}.plot .title{font-weight:600;font-size:11px}
figure{display:inline-block;margin:8px}
"""

SCRIPT = """
window.addEventListener('error', function (e) { document.body.dataset.errors = String(e.message); });
var details = document.getElementById('details');
function show(g) { details.textContent = JSON.stringify(JSON.parse(g.dataset.info), null, 1); }
var nodes = document.querySelectorAll('#tree .node');
nodes.forEach(function (g) { g.addEventListener('click', function () { show(g); }); });
if (nodes.length) { show(nodes[0]); }
document.body.dataset.nodes = String(nodes.length);
document.body.dataset.ready = '1';
"""


def pick_tree(trees: list[FinishedTree], pairs: list[dict], problem: str | None) -> FinishedTree:
    if problem is not None:
        found = [t for t in trees if t.problem_id == problem]
        if not found:
            known = ", ".join(t.problem_id for t in trees[:5])
            raise ShowInputError(f"--problem {problem}: no tree of that id here (some that are: {known})")
        return found[0]
    per_tree = Counter(p["tree_id"] for p in pairs)
    return max(trees, key=lambda t: per_tree.get(f"{t.problem_id}/{t.seed}", 0))


def render(trees: list[FinishedTree], pairs: list[dict], audit: dict, tree: FinishedTree) -> str:
    tid = f"{tree.problem_id}/{tree.seed}"
    mine = [p for p in pairs if p["tree_id"] == tid]
    rows = "".join(
        f"<tr><td>{p['parent_node']}</td><td>{p['chosen_node']}</td><td>{p['rejected_node']}</td>"
        f"<td>{p['chosen_success']:.2f} / {p['rejected_success']:.2f}</td><td>{p['confidence']:.3f}</td>"
        f"<td><pre>{html.escape(p['chosen'])}</pre></td><td><pre>{html.escape(p['rejected'])}</pre></td></tr>"
        for p in mine
    )
    facts = {
        "problems": len(trees),
        "pairs": len(pairs),
        "search success": audit.get("search_success"),
        "greedy success": audit.get("greedy_success"),
        "pair precision": audit.get("pair_precision"),
    }
    head = " · ".join(f"{k}: {_fmt(v) if isinstance(v, float) else v}" for k, v in facts.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>arborist: {html.escape(tid)}</title>
<style>{STYLE}</style></head><body>
<h1>arborist · tree {html.escape(tid)}</h1>
<p>{html.escape(head)}</p>
<p><b>Prompt</b> <code>{html.escape(tree.prompt.strip())}</code> · green: verified correct, red: verified
wrong, thick green edges: the most visited verified solution; a solid green ring: a chosen side of a pair,
a dashed red ring: a rejected side. Click a node for its numbers.</p>
<div id="treebox">{tree_svg(tree, mine)}</div>
<div id="details"></div>
<h2>Pairs at this tree ({len(mine)})</h2>
<table><tr><th>parent</th><th>chosen</th><th>rejected</th><th>S/V chosen / rejected</th><th>confidence</th>
<th>chosen text</th><th>rejected text</th></tr>{rows}</table>
<h2>The job</h2>
{summary_plots(trees, pairs)}
<script>{SCRIPT}</script>
</body></html>
"""


def show(out: str | Path, problem: str | None = None, html_path: str | Path | None = None) -> Path:
    """Write the page for `out` (to `html_path`, default `out/show.html`) and return its path."""
    from rewards.export import atomic_write_text

    trees, pairs, audit = load(out)
    tree = pick_tree(trees, pairs, problem)
    path = Path(html_path) if html_path else Path(out) / "show.html"
    atomic_write_text(path, render(trees, pairs, audit, tree))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="arborist show", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the out= directory of `arborist search`")
    ap.add_argument("--problem", default=None, help="problem id to draw (default: the tree with most pairs)")
    ap.add_argument("--html", default=None, help="where the page goes (default: OUT/show.html)")
    args = ap.parse_args(argv)
    try:
        path = show(args.out, args.problem, args.html)
    except (ShowInputError, OSError) as e:
        print(f"arborist: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"arborist: wrote {path}")
    return 0
