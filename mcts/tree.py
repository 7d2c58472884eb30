"""The forest: many search trees stored as one preallocated structure of arrays.

Every field is a 2-D array of shape [num_trees, capacity] (the kernels see flat views); node ids
are per tree, the root is node `ROOT` of every tree. The children of a node are one contiguous block
`first_child[b, s] : first_child[b, s] + num_children[b, s]`; when adaptive branching is on, an
expansion reserves `child_slots >= num_children` ids so that the node can be widened later
without moving its block.

Ids at or past `num_nodes[b]` hold undefined values: `expand` writes a block whole (its children
and the ids it reserves) when it takes it, so the arrays are not zeroed up front (zeroing 7 MB cost
~5 % of the 64x256x8 search). Read a tree's fields up to `num_nodes[b]` only.

Only numpy here (no torch, no text): the kernels in `mcts.kernels` take `Forest.arrays`, a
tuple in the order of `FIELDS`, so that numba never sees a Python object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROOT = 0
NO_NODE = -1
UNVERIFIED = -1  # outcome of a node that is not a verified terminal

# (name, dtype, meaning). The order is the order of `Forest.arrays` and of the kernels' unpacking.
FIELDS: tuple[tuple[str, type, str], ...] = (
    ("parent", np.int32, "parent id, NO_NODE for the root"),
    ("first_child", np.int32, "id of the first child, NO_NODE while unexpanded"),
    ("num_children", np.int16, "children written so far"),
    ("child_slots", np.int16, "ids reserved for children (>= num_children); widening fills them"),
    ("width_target", np.int16, "adaptive child count n(s) from the importance I(s)"),
    ("depth", np.int16, "root 0, child = parent + 1"),
    ("visits", np.int32, "N: own evaluations (creation, terminal revisits) + children's N"),
    ("virtual_loss", np.int16, "pending selections through the node (counted as value-0 visits)"),
    ("value_sum", np.float64, "W: sum of backed-up values in [0, 1]"),
    ("success_sum", np.float64, "S: sum of backed-up verified success indicators"),
    ("prior", np.float32, "P: policy prior of the option leading to the node"),
    ("score", np.float32, "the node's own evaluation when it was created"),
    ("terminal", np.int8, "1 if the option ended the solution"),
    ("outcome", np.int8, "UNVERIFIED, 0 (verified wrong) or 1 (verified correct)"),
    ("mark", np.int8, "scratch flag of the selection kernel, 0 outside a call"),
    ("verified_visits", np.int32, "V: visits whose evaluation was verified; success rate = S / V"),
)
FIELD_NAMES = tuple(name for name, _, _ in FIELDS)
# A node id before anything is written to it: a fresh root (whose prior is then 1), or an id an
# expansion reserved for widening. `mcts.kernels.expand` writes the same values.
UNWRITTEN = {name: 0 for name in FIELD_NAMES} | {
    "parent": NO_NODE,
    "first_child": NO_NODE,
    "outcome": UNVERIFIED,
}


@dataclass
class Forest:
    """`num_trees` trees of at most `capacity` nodes each, every tree starting as a lone root."""

    num_trees: int
    capacity: int

    def __post_init__(self) -> None:
        if self.num_trees < 1 or self.capacity < 2:
            raise ValueError(
                f"a forest needs num_trees >= 1 and capacity >= 2, got {self.num_trees} and {self.capacity}"
            )
        shape = (self.num_trees, self.capacity)
        for name, dtype, _ in FIELDS:
            field = np.empty(shape, dtype=dtype)
            field[:, ROOT] = UNWRITTEN[name]
            setattr(self, name, field)
        self.num_nodes = np.ones(self.num_trees, dtype=np.int32)  # [B] nodes used, root included
        self.prior[:, ROOT] = 1.0

    @property
    def arrays(self) -> tuple:
        """What every kernel takes: the fields in `FIELDS` order as flat [num_trees * capacity]
        views (node s of tree b at b * capacity + s), plus `num_nodes` last. Flat, because a
        reshape inside a kernel is a C call per field per call; the 2-D attributes share memory."""
        return tuple(getattr(self, name).reshape(-1) for name in FIELD_NAMES) + (self.num_nodes,)

    @classmethod
    def bytes_per_node(cls) -> int:
        return int(sum(np.dtype(dtype).itemsize for _, dtype, _ in FIELDS))

    # -- reading --------------------------------------------------------------------------
    def used(self, name: str) -> np.ndarray:
        """Field `name` over every tree's used ids (< num_nodes[b]), trees concatenated."""
        field = getattr(self, name)
        return np.concatenate([field[b, :n] for b, n in enumerate(self.num_nodes.tolist())])

    def children(self, b: int, node: int) -> np.ndarray:
        first, count = int(self.first_child[b, node]), int(self.num_children[b, node])
        return np.arange(first, first + count) if count else np.empty(0, dtype=np.int64)

    def path(self, b: int, node: int) -> list[int]:
        """Node ids from the root to `node`, both included."""
        out = [int(node)]
        while out[-1] != ROOT:
            out.append(int(self.parent[b, out[-1]]))
        return out[::-1]

    def tree_arrays(self, b: int) -> dict[str, np.ndarray]:
        """Copies of tree `b`'s fields, trimmed to its used nodes (ids stay as they are)."""
        n = int(self.num_nodes[b])
        return {name: getattr(self, name)[b, :n].copy() for name in FIELD_NAMES}
