"""`arborist show`: a self-contained page of a golden tree, loaded in a real headless Chromium.

The browser test needs Chromium from the system packages (`apt-get install chromium`); CI installs
it and sets ARBORIST_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from rewards.cli import main as cli
from rewards.derive import DeriveConfig, derive_all
from rewards.export import DatasetWriter
from rewards.show import ShowInputError, layout, load, show
from tests._trees import GOLDEN_PROMPT, T, build_tree, golden_tree, rich_tree


def _dataset(tmp_path):
    out = tmp_path / "out"
    trees = [golden_tree("golden"), rich_tree("rich")]
    w = DatasetWriter(out, {"seed": 0}, {})
    w.write_shard(derive_all(trees, DeriveConfig(confidence=0.0)), ["golden", "rich"], "shard-00000")
    return out


def test_layout_centres_parents_over_their_children():
    tree = golden_tree()
    x, y = layout(tree)
    kids = {p: [i for i in range(1, tree.num_nodes) if tree.nodes["parent"][i] == p] for p in (0, 1, 2)}
    for p, ks in kids.items():
        assert x[p] == pytest.approx((x[ks[0]] + x[ks[-1]]) / 2)
        assert all(y[k] > y[p] for k in ks)
    leaves = [i for i in range(tree.num_nodes) if not (tree.nodes["parent"] == i).any()]
    assert len({round(float(x[i]), 3) for i in leaves}) == len(leaves), "leaves never overlap"


def test_page_holds_every_node_and_the_pairs(tmp_path):
    out = _dataset(tmp_path)
    path = show(out, problem="golden")
    page = path.read_text()
    tree = golden_tree()
    assert len(re.findall(r'class="node ', page)) == tree.num_nodes
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert "https://" not in page and "<script src" not in page
    # the most visited verified solution (root -> 1 -> 4) is highlighted; the pairs are marked
    assert page.count('class="edge best"') == 2
    assert re.search(r'class="node correct chosen best" data-node="4"', page)
    assert re.search(r'class="node wrong rejected" data-node="5"', page)


def test_bad_input_is_one_line(tmp_path, capsys):
    assert cli(["show", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no manifest.json" in err[0]
    out = _dataset(tmp_path)
    assert cli(["show", str(out), "--problem", "nope"]) == 2
    assert "no tree of that id" in capsys.readouterr().err
    for broken in ("{broken", "[1, 2]"):  # an audit.json edited by hand, or cut short
        (out / "audit.json").write_text(broken)
        assert cli(["show", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "audit.json is not" in err[0], err
    with pytest.raises(ShowInputError, match="no finished tree"):
        empty = tmp_path / "empty"
        DatasetWriter(empty, {}, {}).write_shard(derive_all([], DeriveConfig()), [], "shard-00000")
        load(empty)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    not _chromium() and not os.environ.get("ARBORIST_REQUIRE_BROWSER"),
    reason="no Chromium here (apt-get install chromium); CI requires it",
)
def test_page_loads_in_a_real_browser_without_errors(tmp_path):
    browser = _chromium()
    assert browser, "ARBORIST_REQUIRE_BROWSER is set but no chromium is installed"
    out = _dataset(tmp_path)
    # a tree with an unsolved problem too: every kind of node on one page
    path = show(out, problem="rich", html_path=tmp_path / "rich.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    run = subprocess.run(
        [browser, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body[^>]*>", run.stdout).group(0)
    assert 'data-ready="1"' in body, body  # the script ran to its end
    assert "data-errors" not in body, body  # window.onerror saw nothing
    assert f'data-nodes="{rich_tree().num_nodes}"' in body
    console = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln and "rich.html" in ln]
    assert not console, console
    details = re.search(r'<div id="details">(.*?)</div>', run.stdout, re.S).group(1)
    assert json.loads(details.replace("&quot;", '"'))["node"] == 0  # the root's numbers are shown


def test_unsolved_tree_draws_without_a_best_path(tmp_path):
    out = tmp_path / "out"
    tree = build_tree([T("1 + 1 = 2. Answer: 2", 3, 0)], prompt=GOLDEN_PROMPT, problem_id="u")
    DatasetWriter(out, {}, {}).write_shard(derive_all([tree], DeriveConfig()), ["u"], "shard-00000")
    page = show(out).read_text()
    assert 'class="edge best"' not in page and 'data-node="1"' in page
