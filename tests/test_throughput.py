"""`benchmarks.throughput` end to end on a small search (the figures themselves are the benchmark's)."""

from __future__ import annotations


def test_throughput_benchmark_on_a_small_search(solving_policy):
    """`benchmarks.throughput.measure` end to end on a tiny trained policy: every figure is there, and
    its exactness checks hold (the prompt cache and batches side by side grow the same trees)."""
    from benchmarks.throughput import YARDSTICK_RUNS, measure

    out = measure("tiny", solving_policy, None, problems=4, sims=4, one_leaf=1, device="cpu")
    assert out["same_trees_uncached"] and out["same_steps_side_by_side"]
    assert all(1 <= runs <= YARDSTICK_RUNS for runs in out["yardstick_runs"])
    assert min(out["tokens_per_s_plain"], out["tokens_per_s_search"], out["nodes_per_s_one_leaf"]) > 0
    assert 0 < out["model_share"] <= 1
    assert out["positions_per_token"] <= out["positions_per_token_uncached"]
    # decode steps metered apart: plain sampling's 256-row batches against one leaf's few rows, whose
    # rows cost more each on a CPU (a forward's fixed cost shared by fewer of them)
    rows, cost = out["decode_rows_per_forward"], out["decode_us_per_row"]
    assert rows["plain"] > rows["one_leaf"] >= 1 and rows["search"] >= 1
    assert cost["one_leaf"] > cost["plain"] > 0
