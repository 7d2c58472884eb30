"""A plain-Python object MCTS with exactly the rules of `mcts.kernels`.

It exists to be read and to be compared against: the tests require identical visit counts from
both on deterministic workloads, and `benchmarks/core.py` times both on the same workload. Node
ids are assigned like the kernels' (a per-tree counter that reserves `child_slots` ids per
expansion), so node ids, and hence any id-keyed workload, agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EXPAND, TERMINAL, WIDEN = 0, 1, 2


@dataclass
class Node:
    id: int
    parent: Node | None
    depth: int
    prior: float
    score: float
    terminal: bool = False
    outcome: int = -1
    visits: int = 0
    virtual_loss: int = 0
    value_sum: float = 0.0
    success_sum: float = 0.0
    verified_visits: int = 0
    child_slots: int = 0
    width_target: int = 0
    children: list[Node] = field(default_factory=list)


class ReferenceTree:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.root = Node(id=0, parent=None, depth=0, prior=1.0, score=0.0)
        self.num_nodes = 1
        self.nodes = [self.root]

    # -- selection -------------------------------------------------------------------------
    def _wants_widening(self, s: Node) -> bool:
        return not s.terminal and 0 < len(s.children) < min(s.width_target, s.child_slots)

    @staticmethod
    def _is_leaf(s: Node) -> bool:
        return s.terminal or not s.children

    def select(self, c_puct: float, leaves_per_tree: int) -> list[tuple[Node, int]]:
        selected: set[int] = set()
        exhausted: set[int] = set()
        out: list[tuple[Node, int]] = []
        while len(out) < leaves_per_tree and self.root.id not in exhausted:
            s = self.root
            kind = -1
            while True:
                if self._is_leaf(s):
                    if s.id in selected or s.virtual_loss > 0:
                        exhausted.add(s.id)
                        break
                    kind = TERMINAL if s.terminal else EXPAND
                    break
                if s.id not in selected and self._wants_widening(s):
                    kind = WIDEN
                    break
                sqrt_parent = math.sqrt(float(s.visits + s.virtual_loss))
                best, best_score = None, -math.inf
                for c in s.children:
                    if c.id in exhausted:
                        continue
                    if self._is_leaf(c) and (c.id in selected or c.virtual_loss > 0):
                        continue
                    n = c.visits + c.virtual_loss
                    q = c.value_sum / n if n > 0 else c.score
                    sc = q + c_puct * c.prior * sqrt_parent / (1.0 + n)
                    if sc > best_score:
                        best, best_score = c, sc
                if best is None:
                    exhausted.add(s.id)
                    break
                s = best
            if kind < 0:
                continue
            selected.add(s.id)
            out.append((s, kind))
            node: Node | None = s
            while node is not None:
                node.virtual_loss += 1
                node = node.parent
        return out

    # -- expansion and backup ---------------------------------------------------------------
    def expand(self, s: Node, priors, scores, terminals, outcomes, reserve: int) -> list[Node]:
        k = len(priors)
        if k == 0:
            return []
        if not s.children:
            slots = max(k, reserve)
            if self.num_nodes + slots > self.capacity:
                raise RuntimeError(f"reference tree full: {self.num_nodes} + {slots} > {self.capacity}")
            s.child_slots = slots
            first = self.num_nodes
            self.num_nodes += slots
            self.nodes.extend([None] * slots)  # type: ignore[list-item]
        else:
            if len(s.children) + k > s.child_slots:
                raise RuntimeError("no reserved slot left to widen into")
            first = s.children[0].id + len(s.children)
        new = []
        for j in range(k):
            c = Node(
                id=first + j,
                parent=s,
                depth=s.depth + 1,
                prior=float(priors[j]),
                score=float(scores[j]),
                terminal=bool(terminals[j]),
                outcome=int(outcomes[j]),
            )
            self.nodes[c.id] = c
            s.children.append(c)
            new.append(c)
        return new

    def backup(
        self,
        selected: Node,
        evaluated: list[tuple[Node, float, float]],
        alpha: float,
        c_min: list[int],
        c_max: list[int],
    ) -> None:
        node: Node | None = selected
        while node is not None:
            node.virtual_loss -= 1
            node = node.parent
        # Evaluations share the path above `selected`: their totals go up it once.
        n_tot, w_tot, s_tot, v_tot = 0, 0.0, 0.0, 0
        for start, value, success, verified in evaluated:
            if start is not selected:
                assert start.parent is selected, "an evaluated node must be the selected node or its child"
                start.visits += 1
                start.value_sum += value
                start.success_sum += success
                start.verified_visits += verified
            n_tot += 1
            w_tot += value
            s_tot += success
            v_tot += verified
        node = selected
        while node is not None:
            node.visits += n_tot
            node.value_sum += w_tot
            node.success_sum += s_tot
            node.verified_visits += v_tot
            node = node.parent
        if alpha >= 0.0:
            node = selected
            while node is not None:
                self._refresh_width(node, alpha, c_min, c_max)
                node = node.parent

    @staticmethod
    def _refresh_width(s: Node, alpha: float, c_min: list[int], c_max: list[int]) -> None:
        if not s.children or s.visits == 0:
            return
        q_s = s.value_sum / s.visits
        importance = 0.0
        for c in s.children:
            if c.visits > 0:
                importance = max(importance, abs(c.value_sum / c.visits - q_s))
        d = min(s.depth, len(c_min) - 1)
        s.width_target = max(c_min[d], min(math.floor(alpha * importance) + 1, c_max[d]))

    def visit_counts(self) -> list[int]:
        """Visits per node id, 0 for reserved ids that were never written (like the kernels)."""
        return [n.visits if n is not None else 0 for n in self.nodes]
