"""benchmarks.scaling stops its own `ray start` cluster: every process of it, and no other."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.scaling import _processes_under


def test_a_process_that_renamed_itself_but_logs_under_the_clusters_dir_is_found(tmp_path):
    """Ray's agents rename their command line (`ray::DashboardAgent`) but keep their logs open under
    the node's temp dir; the cleanup must find them there, as it finds the others by command line."""
    marker = str(tmp_path / "arb-ray-x")
    (tmp_path / "arb-ray-x").mkdir()
    log = tmp_path / "arb-ray-x" / "agent.log"
    # a command line that does not name the marker: the path comes in through the environment
    code = "import os, time; f = open(os.environ['LOG'], 'w'); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], env={"LOG": str(log)})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while holder.pid not in _processes_under(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        found = _processes_under(marker)
        assert holder.pid in found, "found by the file it holds open under the marker"
        assert other.pid not in found, "a process with nothing under the marker is left alone"
    finally:
        holder.kill()
        other.kill()
