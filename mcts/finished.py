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
    success_sum  float64 S: sum of backed-up verified success indicators (outcomes of terminals,
                         and of verified rollouts when they are used)
    verified_visits int32 V: visits whose evaluation was verified; S / V is the success rate
                         (critic-only evaluations add to N and W but not to V or S)
    prior        float32 policy prior of the option leading to the node (root 1.0)
    score        float32 the node's own evaluation when it was created (combined critics/rollout)
    terminal     bool    the option ended the solution (or no move is left)
    outcome      int8    -1 not verified / not terminal, 0 verified wrong, 1 verified correct
    value, prm, orm  float32  critic breakdown of `score` (NaN where a critic did not run)
    num_tokens   int32   policy tokens of the option leading to the node
Texts:
    steps        list[str]  the option text leading to each node ("" for the root), without separator
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
}

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

    def __post_init__(self) -> None:
        n = len(self.steps)
        if "verified_visits" not in self.nodes:  # a tree valued only by verified evaluations
            self.nodes["verified_visits"] = np.asarray(self.nodes["visits"])
        for name, dtype in NODE_FIELDS.items():
            arr = np.asarray(self.nodes[name], dtype=dtype)
            assert arr.shape == (n,), f"node field {name} has shape {arr.shape}, expected ({n},)"
            self.nodes[name] = arr

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

    def success_rate(self) -> np.ndarray:
        """S / V per node: NaN where no verified evaluation was backed up."""
        v = self.nodes["verified_visits"]
        return np.where(v > 0, self.nodes["success_sum"] / np.maximum(v, 1), np.nan)

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
            nodes={name: np.asarray(row[name]) for name in NODE_FIELDS},
            steps=[str(s) for s in row["steps"]],
            seed=int(row["seed"]),
            simulations=int(row["simulations"]),
            policy_tokens=int(row["policy_tokens"]),
            meta=json.loads(row["meta"]) if row.get("meta") else {},
        )
