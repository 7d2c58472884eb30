"""A finished search tree: the per-node arrays of one tree, trimmed, plus the texts.

This is the unit that leaves the search: it is what workers send back to the driver, what
`out/trees/*.parquet` stores (one row per tree), and all `rewards.derive` ever reads. It holds
everything needed to re-derive every record, and nothing that needs torch or numba.

Per-node arrays, all of shape [num_nodes], node 0 is the root (the bare prompt):
    parent       int32   parent id, -1 for the root
    depth        int16   root 0, child = parent + 1
    visits       int32   N: backed-up visits = the node's own evaluations (1 when it was created,
                         + 1 per terminal revisit; 0 for the root) + its children's visits
    value_sum    float64 W: sum of backed-up values in [0, 1]; Q = W / N
    success_sum  float64 sum of backed-up verified success indicators per visit (selection
                         bookkeeping like `verified_visits`; the evidence is `evidence()`)
    verified_visits int32 visits whose evaluation was verified (a terminal revisit counts again:
                         this is selection bookkeeping, not evidence; see `evidence()`)
    prior        float32 policy prior of the option leading to the node (root 1.0)
    score        float32 the node's own evaluation when it was created (combined critics/rollout)
    terminal     bool    the option ended the solution (or no move is left)
    outcome      int8    -1 not verified / not terminal, 0 verified wrong, 1 verified correct
    value, prm, orm  float32  critic breakdown of `score` (NaN where a critic did not run)
    num_tokens   int32   policy tokens of the option leading to the node
    rollout_trials     int16  verified rollouts from the node whose verdict is NOT a terminal node
                              of the tree (rollouts that were not grafted, or whose graft was cut)
    rollout_successes  int16  how many of those were verified correct
    eos          bool    the policy ended the node's step with EOS, writing no separator after it
                         (a terminal; every other step the policy wrote ends with the separator)

Evidence (`evidence()`): a *trial* is one distinct verified sample, a terminal node with a verdict
(counted once, however often it is revisited) or a rollout that is not in the tree as a terminal.
A node's trials V and successes S are those in its subtree; S / V is its success rate.
Texts:
    steps        list[str]  the option text leading to each node ("" for the root), without separator
    separator    str        the task's step separator, which ends every step the policy wrote
                            except an `eos` one
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

NODE_FIELDS: dict[str, type] = {
    "parent": np.int32,
    "depth": np.int16,
    "visits": np.int32,
    "value_sum": np.float64,
    "success_sum": np.float64,
    "verified_visits": np.int32,
    "prior": np.float32,
    "score": np.float32,
    "terminal": np.bool_,
    "outcome": np.int8,
    "value": np.float32,
    "prm": np.float32,
    "orm": np.float32,
    "num_tokens": np.int32,
    "rollout_trials": np.int16,
    "rollout_successes": np.int16,
    "eos": np.bool_,
}
# fields a tree written before they existed may lack: (fill value)
_OPTIONAL_FIELDS = {"rollout_trials": 0, "rollout_successes": 0, "eos": False}

UNVERIFIED = -1


@dataclass
class FinishedTree:
    problem_id: str
    task: str
    prompt: str  # the exact text the policy conditioned on
    question: str
    answer: str
    nodes: dict[str, np.ndarray]  # NODE_FIELDS -> array [num_nodes]
    steps: list[str]
    seed: int = 0
    simulations: int = 0  # selection rounds actually run
    policy_tokens: int = 0  # all tokens the policy generated for this tree, rollouts included
    meta: dict = field(default_factory=dict)  # task meta (Countdown numbers/target), config hash, ...
    separator: str = "\n"  # the task's step separator: the policy ended every step with it

    def __post_init__(self) -> None:
        n = len(self.steps)
        if "verified_visits" not in self.nodes:  # a tree valued only by verified evaluations
            self.nodes["verified_visits"] = np.asarray(self.nodes["visits"])
        for name, fill in _OPTIONAL_FIELDS.items():
            if name not in self.nodes:
                self.nodes[name] = np.full(n, fill)
        for name, dtype in NODE_FIELDS.items():
            arr = np.asarray(self.nodes[name], dtype=dtype)
            assert arr.shape == (n,), f"node field {name} has shape {arr.shape}, expected ({n},)"
            self.nodes[name] = arr

    @property
    def tree_id(self) -> str:
        """What every record derived from this tree names it by: "<problem_id>/<seed>"."""
        return f"{self.problem_id}/{self.seed}"

    # -- navigation -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.steps)

    def children(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.nodes["parent"] == node)

    def path(self, node: int) -> list[int]:
        """Node ids from the root's first child down to `node` (the root itself excluded)."""
        out = []
        parent = self.nodes["parent"]
        while node > 0:
            out.append(int(node))
            node = int(parent[node])
        return out[::-1]

    def path_steps(self, node: int) -> list[str]:
        return [self.steps[i] for i in self.path(node)]

    def q(self) -> np.ndarray:
        n = self.nodes["visits"]
        return np.where(n > 0, self.nodes["value_sum"] / np.maximum(n, 1), np.nan)

    def evidence(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, V) per node, int64 [num_nodes]: verified successes and trials in the node's subtree,
        each distinct verified sample counted once (see the module docstring)."""
        nd = self.nodes
        verdict = nd["terminal"] & (nd["outcome"] >= 0)
        trials = verdict.astype(np.int64) + nd["rollout_trials"]
        successes = (verdict & (nd["outcome"] == 1)).astype(np.int64) + nd["rollout_successes"]
        parent, depth = nd["parent"].astype(np.int64), nd["depth"]
        for d in range(int(depth.max(initial=0)), 0, -1):
            level = np.flatnonzero(depth == d)
            np.add.at(trials, parent[level], trials[level])
            np.add.at(successes, parent[level], successes[level])
        return successes, trials

    def success_rate(self) -> np.ndarray:
        """S / V per node over distinct verified samples: NaN where there is none."""
        s, v = self.evidence()
        return np.where(v > 0, s / np.maximum(v, 1), np.nan)

    # -- serialisation (one parquet row; plain lists, no pickle) -----------------------------
    def to_row(self) -> dict:
        row = {
            "problem_id": self.problem_id,
            "task": self.task,
            "prompt": self.prompt,
            "question": self.question,
            "answer": self.answer,
            "steps": list(self.steps),
            "seed": int(self.seed),
            "simulations": int(self.simulations),
            "policy_tokens": int(self.policy_tokens),
            "meta": json.dumps(self.meta, sort_keys=True),
            "separator": self.separator,
        }
        for name in NODE_FIELDS:
            row[name] = self.nodes[name].tolist()
        return row

    @classmethod
    def from_row(cls, row: dict) -> FinishedTree:
        return cls(
            problem_id=str(row["problem_id"]),
            task=str(row["task"]),
            prompt=str(row["prompt"]),
            question=str(row["question"]),
            answer=str(row["answer"]),
            nodes={name: np.asarray(row[name]) for name in NODE_FIELDS if name in row},
            steps=[str(s) for s in row["steps"]],
            seed=int(row["seed"]),
            simulations=int(row["simulations"]),
            policy_tokens=int(row["policy_tokens"]),
            meta=json.loads(row["meta"]) if row.get("meta") else {},
            separator=str(row.get("separator") or "\n"),  # trees written before it existed used "\n"
        )
