"""Search at the speed of generation: how much of the model's work the search turns into tokens.

    python -m benchmarks.throughput                      # embedded policy + two 27M Llamas, CPU
    python -m benchmarks.throughput --device cuda --json out/benchmarks/throughput.json --plot out/tp.png

For each model, in one process and one run, with one torch thread on CPU:

- plain: batched sampling of whole solutions from the search's own prompts (`Policy.rollout`, the
  search's batch of rows): the model's best case, the yardstick; also transformers' `generate` on
  the same rows (`tokens_per_s_ratio_vs_generate`), the yardstick before `mcts.decode`; each timed
  up to 5 times (3 s), the median run counted (a plain call of the embedded policy is ~0.3 s);
- search: `run_search` on the same problems with the default settings (`SearchConfig()`,
  `ExpandConfig()`; the embedded critics for the embedded policy);
- one leaf: the same search, one tree and one leaf at a time (`leaves_per_tree=1`), on fewer problems.

Reported (under the model's name; the embedded policy's also at the top level):

- `tokens_per_s_ratio`: policy tokens per second of the search / of plain sampling (goal >= 0.8);
- `positions_per_token`: positions run through the policy per generated token, prompt positions and
  padding included, in the search (goal <= 3; plain sampling's is reported beside it);
- `model_share`: share of the search's wall time spent inside model forwards, policy and critics
  (goal >= 0.95);
- `batched_vs_one_leaf`: nodes per second of the batched search / of the one-leaf search (goal >= 5);
- `decode_rows_per_forward`, `decode_us_per_row` (search, plain, one_leaf): the policy's decode
  steps, their mean batch and their cost a row; and `tokens_per_s_ratio_decode_only`, the ratio
  the search would reach if its wall time were its decode forwards alone. Where a small forward
  costs more a row than a full one (a CPU), these bound the ratio from the batches the search's
  own structure makes, and say how much batching can buy batched_vs_one_leaf (docs/measurements.md);
- `shared_prefill_speedup`: the search's wall time with every row prefilling its own prompt / with
  one prefill per distinct prompt (`Policy.share_prefill`), same seed, same trees;
- `prefix_cache_speedup`: the search's wall time with every prompt prefilled whole / with the
  prompt KV cache across calls (`mcts.prefix_cache`; positions per token beside it), and
  `same_trees_uncached`: whether the two searches grew identical trees;
- `side_by_side_speedup`: the same problems cut into the job's batches (`search.batch_problems`),
  searched one batch after another / two side by side (`mcts.search.search_stream`, what
  `ray.batches_per_worker=2` does in a worker), with `policy_forwards_side_by_side` (the policy's
  forward passes, side by side / one after another: on a GPU, where a small batch's forward costs
  what a full one does, the wall time follows it), `same_steps_side_by_side` (every tree's steps
  and visits identical) and `tokens_per_s_ratio_side_by_side` (the two side by side against plain
  sampling: the job's way, where a batch's last rounds, with few of its trees left, share passes).

Two models of ~27M parameters, where compute per position dominates as it does for a real model on
a GPU: `wide`, a random Llama on the embedded tokenizer (its steps are noise, so its trees are
shallow: most options end without a separator and become terminals), and `wide_policy`, the
embedded policy inside a Llama 4x as wide and twice as deep (`policy_in_wide_llama`: the extra width
and depth are zeros), which proposes the embedded policy's steps and so grows trees as deep as the
embedded search's, with their rollouts and prompt reuse.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import environment, format_table, write_json
from benchmarks._wide_models import policy_in_wide_llama, wide_llama

# plain sampling and `generate` are timed up to YARDSTICK_RUNS times, until YARDSTICK_S seconds have
# passed (a wide model's call lasts longer: once), an odd number of times; the run of median tokens/s
# counts
YARDSTICK_RUNS, YARDSTICK_S = 5, 3.0


class ModelMeter:
    """Seconds spent inside a module's forward (forward hooks). On a GPU the hooks wait for the
    device first: kernels run after their launch returns, so without the waits a forward's time
    would land in whatever reads its result next (the search's own code). Decode steps (one new
    position a row) are also counted apart: their seconds and rows, so a run's per-row cost and
    batch sizes can be read next to plain sampling's."""

    def __init__(self, module):
        import torch

        self.seconds, self._t0, self.calls = 0.0, 0.0, 0
        self.decode = [0.0, 0, 0]  # decode steps: seconds, rows summed over them, how many
        self._rows = 0  # rows of the forward running now; 0 when it is not a decode step
        device = next(module.parameters()).device
        self._wait = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        # a decode step runs one position a row; a prefill may too (a prompt one token past a cached
        # one) but asks for its last logits only (`logits_to_keep`, where the model takes it)
        step = ids is not None and ids.dim() == 2 and ids.shape[1] == 1 and "logits_to_keep" not in kwargs
        self._rows = ids.shape[0] if step else 0
        self._wait()
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self._wait()
        seconds = time.perf_counter() - self._t0
        self.seconds += seconds
        self.calls += 1
        if self._rows:
            self.decode[0] += seconds
            self.decode[1] += self._rows
            self.decode[2] += 1


def hf_generate(policy, prompts: list[str]) -> int:
    """transformers' own batched sampling of the same rows (every row decodes until the last one
    stops): the yardstick before `mcts.decode`. Returns the tokens kept (up to each row's EOS)."""
    import torch

    tok = policy.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True).to(policy.device)
    with torch.inference_mode():
        out = policy.model.generate(
            **enc, max_new_tokens=policy.cfg.max_rollout_tokens, do_sample=True, top_k=0,
            pad_token_id=tok.pad_token_id, eos_token_id=policy.eos_token_ids,
        )  # fmt: skip
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = set(policy.eos_token_ids)
    return sum(next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in new)


def measure(
    name: str,
    policy_dir: Path,
    critics_dir: Path | None,
    problems: int,
    sims: int,
    one_leaf: int,
    device: str,
):
    from critics.base import CriticsConfig, CriticSet
    from mcts.base import ExpandConfig, PolicyConfig, SearchConfig
    from mcts.embedded import evaluation_problems
    from mcts.expander import PolicyExpander
    from mcts.policy import Policy
    from mcts.search import run_search, search_stream
    from mcts.tasks.countdown import CountdownTask
    from rewards.config import SearchConf

    task = CountdownTask()
    policy = Policy.load(PolicyConfig(path=str(policy_dir), device=device, dtype="float32"))
    meters = [ModelMeter(policy.model)]
    critics = None
    if critics_dir is not None:
        critics = CriticSet.load(CriticsConfig(device=device), task, default_dir=critics_dir)
        meters += [ModelMeter(c.model) for c in (critics.prm, critics.orm) if c is not None]
        if critics.value is not None:
            # on the PRM's pass every head runs its top block and head only; on its own pass the
            # value function's model runs whole, and its members' top blocks and heads after it
            heads = [critics.value, *critics.value.members]
            if not critics.shared_trunk:
                meters.append(ModelMeter(heads.pop(0).model))
            for value in (c.model for c in heads):
                meters += [ModelMeter(m) for m in (value.model.layers[-1], value.model.norm, value.score)]
    cfg = CriticsConfig() if critics is not None else ExpandConfig()
    expander = PolicyExpander(policy, task, cfg, critics=critics)
    probs = evaluation_problems("test", problems)
    search = SearchConfig(simulations=sims)

    # warm-up: kernels compiled and loaded, torch's first calls made, before anything is timed
    run_search(probs[:2], task, expander, SearchConfig(simulations=2, max_nodes=64), seed=1)

    def timed(fn):
        model0, pos0 = sum(m.seconds for m in meters), policy.positions_run
        dec0 = list(meters[0].decode)
        tok0, t0 = policy.tokens_generated, time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "tokens": policy.tokens_generated - tok0,
            "positions": policy.positions_run - pos0,
            "model_s": sum(m.seconds for m in meters) - model0,
            "decode": [now - before for now, before in zip(meters[0].decode, dec0, strict=True)],
            "result": result,
        }

    def decode_figures(runs: dict) -> dict:
        """Per run: the policy's rows per decode forward and microseconds a row of it (what a batch's
        size buys on this device), and the tokens/s ratio the search would have if its wall time
        were its decode forwards alone (no prefill, critics or Python): what batching leaves."""
        out = {
            "decode_rows_per_forward": {
                k: round(r["decode"][1] / max(1, r["decode"][2]), 1) for k, r in runs.items()
            },
            "decode_us_per_row": {
                k: round(1e6 * r["decode"][0] / max(1, r["decode"][1]), 1) for k, r in runs.items()
            },
        }
        search = runs["search"]
        out["tokens_per_s_ratio_decode_only"] = round(
            search["tokens"]
            / max(search["decode"][0], 1e-9)
            / (runs["plain"]["tokens"] / runs["plain"]["wall_s"]),
            3,
        )
        return out

    def median_rate(fn, tokens_of) -> dict:
        """The run of median tokens/s, timed until YARDSTICK_RUNS runs or YARDSTICK_S seconds: one
        call of the embedded policy lasts ~0.3 s, and single calls swung its tokens/s by a third."""
        runs: list[dict] = []
        while len(runs) % 2 == 0 or (
            len(runs) < YARDSTICK_RUNS and sum(r["wall_s"] for r in runs) < YARDSTICK_S
        ):
            runs.append(timed(fn))  # an odd count: the median is one run
        runs.sort(key=lambda r: tokens_of(r) / r["wall_s"])
        return {**runs[len(runs) // 2], "runs": len(runs)}

    def cold_rollout(rows):
        policy.reset_prefix_cache()  # plain sampling starts cold: nothing of before is reused
        return policy.rollout(rows, seed=0)

    prompts = [task.prompt(p) for p in probs]
    rows = prompts * max(1, policy.cfg.max_batch // len(prompts))
    plain = median_rate(lambda: cold_rollout(rows), lambda r: r["tokens"])
    generate = median_rate(lambda: hf_generate(policy, rows), lambda r: r["result"])
    batched = timed(lambda: run_search(probs, task, expander, search, seed=0))
    policy.share_prefill = False  # the same search with every row prefilling its own prompt
    unshared = timed(lambda: run_search(probs, task, expander, search, seed=0))
    policy.share_prefill = True
    prefix_cache, policy.prefix_cache = policy.prefix_cache, None  # every prompt prefilled whole
    uncached = timed(lambda: run_search(probs, task, expander, search, seed=0))
    policy.prefix_cache = prefix_cache
    single = timed(
        lambda: [
            t
            for p in probs[:one_leaf]
            for t in run_search(
                [p], task, expander, SearchConfig(simulations=sims, leaves_per_tree=1), seed=0
            )
        ]
    )
    size = SearchConf().batch_problems
    batches = [(i, probs[i : i + size]) for i in range(0, len(probs), size)]
    forwards = []
    by_stream = {}
    for side in (1, 2):
        calls0 = meters[0].calls
        by_stream[side] = timed(lambda: dict(search_stream(batches, task, expander, search, 0, side)))  # noqa: B023
        forwards.append(meters[0].calls - calls0)
    stream_trees = [[t for k in sorted(r["result"]) for t in r["result"][k]] for r in by_stream.values()]
    nodes = sum(t.num_nodes for t in batched["result"])
    nodes_one = sum(t.num_nodes for t in single["result"])
    tps = {k: r["tokens"] / r["wall_s"] for k, r in (("plain", plain), ("search", batched))}
    tps["generate"] = generate["result"] / generate["wall_s"]
    return {
        "model": name,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "device": device,
        "problems": problems,
        "simulations": sims,
        "tokens_per_s_plain": round(tps["plain"], 1),
        "tokens_per_s_search": round(tps["search"], 1),
        "tokens_per_s_generate": round(tps["generate"], 1),
        "yardstick_runs": [plain["runs"], generate["runs"]],  # how many runs each yardstick's median took
        "tokens_per_s_ratio": round(tps["search"] / tps["plain"], 3),
        "tokens_per_s_ratio_vs_generate": round(tps["search"] / tps["generate"], 3),
        "positions_per_token": round(batched["positions"] / max(1, batched["tokens"]), 2),
        "positions_per_token_plain": round(plain["positions"] / max(1, plain["tokens"]), 2),
        "model_share": round(batched["model_s"] / batched["wall_s"], 3),
        "nodes_per_s": round(nodes / batched["wall_s"], 1),
        "nodes_per_s_one_leaf": round(nodes_one / single["wall_s"], 1),
        "batched_vs_one_leaf": round((nodes / batched["wall_s"]) / (nodes_one / single["wall_s"]), 2),
        "search_wall_s": round(batched["wall_s"], 1),
        "shared_prefill_speedup": round(unshared["wall_s"] / batched["wall_s"], 3),
        "positions_per_token_unshared": round(unshared["positions"] / max(1, unshared["tokens"]), 2),
        "prefix_cache_speedup": round(uncached["wall_s"] / batched["wall_s"], 3),
        "positions_per_token_uncached": round(uncached["positions"] / max(1, uncached["tokens"]), 2),
        "same_trees_uncached": _same_trees(batched["result"], uncached["result"]),
        "side_by_side_speedup": round(by_stream[1]["wall_s"] / by_stream[2]["wall_s"], 3),
        # the job's way (batches of `search.batch_problems`, two side by side) against the yardstick
        "tokens_per_s_ratio_side_by_side": round(
            by_stream[2]["tokens"] / by_stream[2]["wall_s"] / tps["plain"], 3
        ),
        "policy_forwards_side_by_side": round(forwards[1] / max(1, forwards[0]), 3),
        "same_steps_side_by_side": _same_trees(*stream_trees),
        "generate_calls": policy.generate_calls,
        **decode_figures({"search": batched, "plain": plain, "one_leaf": single}),
    }


def plot(payload: dict, path) -> Path:
    """Each model's figures as a share of their goal (1: met; positions per token as 3 / it)."""
    from benchmarks._report import bar_plot

    models = [m for m in ("embedded", "wide", "wide_policy") if m in payload]
    goals = {"tokens_per_s_ratio": 0.8, "model_share": 0.95}
    series = {f"{k} / {g}": [payload[m][k] / g for m in models] for k, g in goals.items()}
    series["batched_vs_one_leaf / 5"] = [payload[m]["batched_vs_one_leaf"] / 5 for m in models]
    series["3 / positions_per_token"] = [3 / payload[m]["positions_per_token"] for m in models]
    title = "search throughput against its goals"
    return bar_plot(path, models, series, "share of the goal (1: met)", title, log=False, line=1.0)


def _same_trees(a, b) -> bool:
    """Every tree's step texts and visit counts identical (the prefix cache must not change them)."""
    return all(
        x.steps == y.steps and (x.nodes["visits"] == y.nodes["visits"]).all()
        for x, y in zip(a, b, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--simulations", type=int, default=64)
    ap.add_argument(
        "--one-leaf-problems", type=int, default=4, help="problems the embedded one-leaf search runs"
    )
    ap.add_argument(
        "--wide-problems", type=int, default=64, help="problems for each wide model (0: skip them)"
    )
    ap.add_argument("--wide-simulations", type=int, default=16)
    ap.add_argument(
        "--wide-one-leaf-problems",
        type=int,
        default=1,
        help="problems each wide model's one-leaf search runs (its first; one is minutes of a 27M model)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--plot", default="", help="PNG: each model's figures against their goals")
    args = ap.parse_args(argv)

    import torch

    from mcts.embedded import bootstrap_policy
    from rewards.critic_bootstrap import ensure_default_critics

    torch.set_num_threads(args.threads)
    policy_dir = bootstrap_policy(0)
    critics_dir = ensure_default_critics(0, policy_dir)
    results = [
        measure(
            "embedded",
            policy_dir,
            critics_dir,
            args.problems,
            args.simulations,
            args.one_leaf_problems,
            args.device,
        )
    ]
    if args.wide_problems:
        with tempfile.TemporaryDirectory() as tmp:
            builders = {  # each built only when its turn comes
                "wide": lambda: wide_llama(policy_dir, Path(tmp) / "wide", args.device),
                "wide_policy": lambda: policy_in_wide_llama(policy_dir, Path(tmp) / "wide-policy"),
            }
            for name, build in builders.items():
                results.append(
                    measure(
                        name,
                        build(),
                        None,
                        args.wide_problems,
                        args.wide_simulations,
                        args.wide_one_leaf_problems,
                        args.device,
                    )  # fmt: skip
                )
    columns = [
        ("model", "model", "s"),
        ("parameters", "params", ","),
        ("tokens_per_s_ratio", "tokens/s ratio (>=0.8)", ".3f"),
        ("tokens_per_s_ratio_vs_generate", "vs generate", ".3f"),
        ("positions_per_token", "positions/token (<=3)", ".2f"),
        ("positions_per_token_plain", "plain", ".2f"),
        ("tokens_per_s_ratio_decode_only", "ratio, decode only", ".3f"),
        ("model_share", "model share (>=0.95)", ".3f"),
        ("batched_vs_one_leaf", "batched/one-leaf (>=5)", ".2f"),
        ("search_wall_s", "search s", ".1f"),
        ("shared_prefill_speedup", "shared prefill x", ".2f"),
        ("prefix_cache_speedup", "prefix cache x", ".2f"),
        ("side_by_side_speedup", "side by side x", ".2f"),
        ("policy_forwards_side_by_side", "forwards side by side", ".2f"),
    ]
    print(format_table(results, columns))
    head = results[0]
    keys = ("tokens_per_s_ratio", "positions_per_token", "model_share", "batched_vs_one_leaf")
    payload = {"environment": environment(), **{k: head[k] for k in keys}, "embedded": head}
    for extra in results[1:]:
        payload[extra["model"]] = extra
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        print(f"wrote {plot(payload, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
