"""Column schemas of the records `rewards.derive` produces and `rewards.export` writes, and the
texts they are made of with the keys that find duplicate records.

This is what users script against. Every kind is one directory of parquet shards under the output
directory (`out/<kind>/*.parquet`); the leading columns are the ones TRL's trainers read, the rest
is metadata. Every record carries `problem_id`, `tree_id` (`"<problem_id>/<seed>"`) and
`config_hash` (the derivation config, or the whole job's config when the pipeline passes one).
Node ids index the tree's arrays in `out/trees` (node 0 is the root, the bare prompt).
Texts: a *prefix* is `tree.prompt` followed by steps, each ended by the task's step separator
(the tree's `separator`, "\\n" for the built-in tasks); a *completion* is steps, each ended by it
as the policy ends every step of its own solutions, with no EOS text (TRL appends EOS itself).
`prefix_text`, `completion_text` and `text_steps` (their inverse) build and read these texts;
the keys (`pair_key`, `kto_key`, `solution_key`, `dedupe`) compare them whitespace-insensitively.

Evidence: a *trial* is one distinct verified sample below a node: a terminal node the verifier
judged (counted once, however often the search revisited it) or a verified rollout whose path is
not in the tree as a terminal (a grafted rollout is its terminal, one trial). A node's success rate
is S / V over its trials; visits N only steer the search. Every gate and label below (Wilson
confidence, margin, soft labels, value targets, KTO success) is built on trials.
Every chosen, SFT and desirable completion ends at a verified-correct terminal and every rejected
and undesirable one at a verified-wrong terminal: no exported negative is a text the verifier accepts.

pairs — TRL preference format (DPOTrainer; RewardTrainer reads `margin`)
    column            type     meaning
    prompt            string   shared prefix: the prompt + the steps down to the parent node
    chosen            string   the better sibling step + its most visited verified-correct continuation
    rejected          string   the worse sibling step + its most visited verified-wrong continuation
    margin            float64  chosen_success - rejected_success (> 0)
    problem_id        string   problem id
    tree_id           string   "<problem_id>/<seed>"
    parent_node       int32    node id of the shared prefix
    chosen_node       int32    node id of the chosen step
    rejected_node     int32    node id of the rejected step
    chosen_end        int32    node id where chosen's continuation ends
    rejected_end      int32    node id where rejected's continuation ends
    depth             int32    depth of the two step nodes (root children: 1)
    chosen_q          float64  Q = W / N of the chosen step node
    rejected_q        float64  Q of the rejected step node
    chosen_n          int32    N (visits) of the chosen step node
    rejected_n        int32    N of the rejected step node
    chosen_v          int32    V (trials: distinct verified samples) of the chosen step node
    rejected_v        int32    V of the rejected step node
    chosen_success    float64  S / V of the chosen step node
    rejected_success  float64  S / V of the rejected step node
    confidence        float64  highest two-sided level at which the Wilson intervals still separate
    separation_z      float64  the z score of that level
    chosen_verified   bool     chosen's continuation ends at a verified correct terminal
    chosen_outcome    int8     outcome at chosen_end (-1 unverified/not terminal, 0 wrong, 1 right)
    rejected_outcome  int8     outcome at rejected_end
    chosen_terminal   bool     the chosen step itself ended the solution
    rejected_terminal bool     the rejected step itself ended the solution
    chosen_value      float32  value critic of the chosen step node (NaN if it did not run)
    chosen_prm        float32  PRM score of the chosen step node
    chosen_orm        float32  ORM score of the chosen step node
    rejected_value    float32  value critic of the rejected step node
    rejected_prm      float32  PRM score of the rejected step node
    rejected_orm      float32  ORM score of the rejected step node
    config_hash       string   hash of the config that produced the record

steps — TRL stepwise supervision format (PRM training)
    column            type           meaning
    prompt            string         the problem prompt (tree.prompt)
    completions       list<string>   the steps of one root-to-terminal path
    labels            list<bool>     hard label per step: a verified success (a correct terminal or rollout) lies below it
    soft_labels       list<float64>  soft label per step: the step node's success rate S / V
                                     over trials (NaN where V = 0: no verified sample below it)
    problem_id        string         problem id
    tree_id           string         "<problem_id>/<seed>"
    nodes             list<int32>    node id of each step
    visits            list<int32>    N of each step node
    q                 list<float64>  Q of each step node
    end_node          int32          the terminal node
    outcome           int8           its verified outcome (-1, 0, 1)
    config_hash       string         config hash

kto — TRL unpaired preference format (KTOTrainer)
    column            type     meaning
    prompt            string   prefix text
    completion        string   steps, each ended by the separator
    label             bool     desirable
    source            string   "pair": a side of an accepted pair (same prompt/completion);
                               "trajectory": a whole verified path from the bare prompt
    problem_id        string   problem id
    tree_id           string   "<problem_id>/<seed>"
    node              int32    the node whose statistics decided the label: a pair side's step
                               node, or a trajectory's terminal
    end_node          int32    last node of the completion
    depth             int32    depth of `node`
    q                 float64  Q of `node`
    n                 int32    N of `node`
    success           float64  S / V of `node` (over trials)
    outcome           int8     outcome at end_node
    config_hash       string   config hash

sft — TRL prompt-completion format (SFTTrainer): the most visited distinct verified trajectories per
problem (`sft_solutions`, 1 by default: the best one)
    column                 type     meaning
    prompt                 string   the problem prompt (tree.prompt)
    completion             string   the steps of the most visited verified-correct path
    problem_id             string   problem id
    tree_id                string   the tree it came from
    end_node               int32    the correct terminal
    visits                 int32    its N
    q                      float64  its Q
    depth                  int32    number of steps
    num_verified_terminals int32    verified-correct terminals in that tree
    config_hash            string   config hash

values — value-function targets, one per visited node
    column            type     meaning
    prompt            string   the full prefix text of the node (prompt + its steps, each + separator)
    value             float64  the target: success rate (default) or Q, per DeriveConfig.value_target
                               (with "success", nodes without verified visits get no row)
    visits            int32    N of the node
    trials            int32    V: distinct verified samples in the node's subtree
    success           float64  S / V
    q                 float64  W / N
    verified_below    bool     a verified correct terminal lies in the node's subtree
    success_below     bool     S > 0: a verified success (a correct terminal or rollout) lies below
    problem_id        string   problem id
    tree_id           string   "<problem_id>/<seed>"
    node              int32    node id
    depth             int32    node depth
    terminal          bool     the node is terminal
    config_hash       string   config hash

trees — one finished tree per row: exactly `FinishedTree.to_row()` (see mcts/finished.py);
`FinishedTree.from_row(row)` rebuilds it, and `rewards.derive` re-derives every kind above from it.
    column            type           meaning
    problem_id        string         problem id
    task              string         task name
    prompt            string         the exact text the policy conditioned on
    question          string         human-readable problem statement
    answer            string         reference answer
    steps             list<string>   option text leading to each node ("" for the root)
    seed              int64          search seed
    simulations       int64          selection rounds run
    policy_tokens     int64          tokens the policy generated for this tree
    meta              string         JSON: task meta, config hash, ...
    separator         string         the task's step separator (every text above ends each step with it)
    parent            list<int32>    per node: parent id (-1 for the root)
    depth             list<int16>    per node: depth (root 0)
    visits            list<int32>    per node: N
    value_sum         list<float64>  per node: W (Q = W / N)
    success_sum       list<float64>  per node: verified successes backed up per visit (selection)
    verified_visits   list<int32>    per node: visits with a verified evaluation (selection; the
                                     evidence is rebuilt from terminals + rollout_trials)
    prior             list<float32>  per node: policy prior of the option
    score             list<float32>  per node: combined evaluation at creation
    terminal          list<bool>     per node: the option ended the solution
    outcome           list<int8>     per node: -1 unverified, 0 wrong, 1 correct
    value             list<float32>  per node: value critic (NaN if not run)
    prm               list<float32>  per node: PRM score
    orm               list<float32>  per node: ORM score
    num_tokens        list<int32>    per node: policy tokens of the option
    rollout_trials    list<int16>    per node: verified rollouts not in the tree as a terminal
    rollout_successes list<int16>    per node: verified correct ones among them
    eos               list<bool>     per node: the policy ended the step with EOS (no separator after it)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa

from mcts.finished import NODE_FIELDS, FinishedTree

S, F64, F32, I32, I8, B = pa.string(), pa.float64(), pa.float32(), pa.int32(), pa.int8(), pa.bool_()

_META_TAIL = [("config_hash", S)]

PAIRS_SCHEMA = pa.schema(
    [
        ("prompt", S),
        ("chosen", S),
        ("rejected", S),
        ("margin", F64),
        ("problem_id", S),
        ("tree_id", S),
        ("parent_node", I32),
        ("chosen_node", I32),
        ("rejected_node", I32),
        ("chosen_end", I32),
        ("rejected_end", I32),
        ("depth", I32),
        ("chosen_q", F64),
        ("rejected_q", F64),
        ("chosen_n", I32),
        ("rejected_n", I32),
        ("chosen_v", I32),
        ("rejected_v", I32),
        ("chosen_success", F64),
        ("rejected_success", F64),
        ("confidence", F64),
        ("separation_z", F64),
        ("chosen_verified", B),
        ("chosen_outcome", I8),
        ("rejected_outcome", I8),
        ("chosen_terminal", B),
        ("rejected_terminal", B),
        ("chosen_value", F32),
        ("chosen_prm", F32),
        ("chosen_orm", F32),
        ("rejected_value", F32),
        ("rejected_prm", F32),
        ("rejected_orm", F32),
        *_META_TAIL,
    ]
)

STEPS_SCHEMA = pa.schema(
    [
        ("prompt", S),
        ("completions", pa.list_(S)),
        ("labels", pa.list_(B)),
        ("soft_labels", pa.list_(F64)),
        ("problem_id", S),
        ("tree_id", S),
        ("nodes", pa.list_(I32)),
        ("visits", pa.list_(I32)),
        ("q", pa.list_(F64)),
        ("end_node", I32),
        ("outcome", I8),
        *_META_TAIL,
    ]
)

KTO_SCHEMA = pa.schema(
    [
        ("prompt", S),
        ("completion", S),
        ("label", B),
        ("source", S),
        ("problem_id", S),
        ("tree_id", S),
        ("node", I32),
        ("end_node", I32),
        ("depth", I32),
        ("q", F64),
        ("n", I32),
        ("success", F64),
        ("outcome", I8),
        *_META_TAIL,
    ]
)

SFT_SCHEMA = pa.schema(
    [
        ("prompt", S),
        ("completion", S),
        ("problem_id", S),
        ("tree_id", S),
        ("end_node", I32),
        ("visits", I32),
        ("q", F64),
        ("depth", I32),
        ("num_verified_terminals", I32),
        *_META_TAIL,
    ]
)

VALUES_SCHEMA = pa.schema(
    [
        ("prompt", S),
        ("value", F64),
        ("visits", I32),
        ("trials", I32),
        ("success", F64),
        ("q", F64),
        ("verified_below", B),
        ("success_below", B),
        ("problem_id", S),
        ("tree_id", S),
        ("node", I32),
        ("depth", I32),
        ("terminal", B),
        *_META_TAIL,
    ]
)

_ARROW_OF_NUMPY = {
    "int32": pa.int32(),
    "int16": pa.int16(),
    "int8": pa.int8(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
}

TREES_SCHEMA = pa.schema(
    [
        ("problem_id", S),
        ("task", S),
        ("prompt", S),
        ("question", S),
        ("answer", S),
        ("steps", pa.list_(S)),
        ("seed", pa.int64()),
        ("simulations", pa.int64()),
        ("policy_tokens", pa.int64()),
        ("meta", S),  # JSON text
        ("separator", S),
    ]
    + [(name, pa.list_(_ARROW_OF_NUMPY[np.dtype(dtype).name])) for name, dtype in NODE_FIELDS.items()]
)

# The kinds in the order they are written; each is a directory under the output directory.
SCHEMAS: dict[str, pa.Schema] = {
    "pairs": PAIRS_SCHEMA,
    "steps": STEPS_SCHEMA,
    "kto": KTO_SCHEMA,
    "sft": SFT_SCHEMA,
    "values": VALUES_SCHEMA,
    "trees": TREES_SCHEMA,
}
KINDS: tuple[str, ...] = tuple(SCHEMAS)


def to_table(kind: str, rows: list[dict]) -> pa.Table:
    """Rows of one kind -> a pyarrow table with exactly that kind's schema (0 rows allowed).

    Raises ValueError naming the kind and the missing/extra columns when a row does not match,
    so a schema drift fails loudly here rather than as a confusing parquet or TRL error later.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {list(KINDS)}")
    schema = SCHEMAS[kind]
    if rows:
        want, got = set(schema.names), set(rows[0])
        if want != got:
            raise ValueError(
                f"{kind} rows do not match the {kind} schema: missing {sorted(want - got)}, "
                f"extra {sorted(got - want)} (see rewards/records.py)"
            )
    return pa.Table.from_pylist(rows, schema=schema)


def column_docs() -> dict[str, str]:
    """The column table of each kind, cut from this module's docstring (the single source the
    dataset card quotes; tests check it names every schema column)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in (__doc__ or "").splitlines():
        head = line.split(" — ", 1)[0]
        if head in SCHEMAS and not line.startswith(" "):
            current = head
            out[current] = []
        if current is not None:
            out[current].append(line)
    return {k: "\n".join(v).strip() for k, v in out.items()}


# -- texts and duplicate keys ----------------------------------------------------------------------
def prefix_text(tree: FinishedTree, node: int) -> str:
    """The text the policy conditioned on at `node`: the prompt and each step followed by the tree's
    separator."""
    return tree.prompt + completion_text(tree, tree.path(node))


def completion_text(tree: FinishedTree, nodes: list[int]) -> str:
    """The steps of `nodes` as the policy wrote them: each ended by the tree's separator, except a
    step the policy ended with EOS (`eos`: nothing after its text; TRL appends the EOS)."""
    eos = tree.nodes["eos"]
    return "".join(tree.steps[i] if eos[i] else tree.steps[i] + tree.separator for i in nodes)


def text_steps(tree: FinishedTree, prefix: str, completion: str) -> list[str] | None:
    """The steps an exported (prefix, completion) holds under `tree`'s prompt and separator: the
    inverse of `prefix_text` + `completion_text`, up to an empty last step the policy ended with EOS
    (it leaves no text). None when the text does not start with the tree's prompt."""
    text = prefix + completion
    if not text.startswith(tree.prompt):
        return None
    steps = text[len(tree.prompt) :].split(tree.separator)
    if steps[-1] == "":  # the last step ended with the separator (or there is none)
        steps.pop()
    return steps


def normalize_text(text: str) -> str:
    """Whitespace-insensitive form used to detect near-duplicate records."""
    return " ".join(text.split())


def solution_key(steps: list[str], separator: str = "\n") -> str:
    """What makes two solutions the same one: their steps, whitespace-insensitively."""
    return normalize_text(separator.join(steps))


def dedupe(
    rows: Iterable[dict],
    key: Callable[[dict], tuple],
    label: str | None = None,
    normalize: Callable = lambda x: x,
) -> list[dict]:
    """Keep the first row per key. With `label`, a key seen with two different (normalized) values of
    `label` is a contradiction, and every row of that key is dropped."""
    first: dict[tuple, dict] = {}
    conflicted: set[tuple] = set()
    for r in rows:
        k = key(r)
        if k not in first:
            first[k] = r
        elif label is not None and normalize(first[k][label]) != normalize(r[label]):
            conflicted.add(k)
    return [r for k, r in first.items() if k not in conflicted]


def pair_key(row: dict) -> tuple:
    """Identity of a pair: problem, prompt and the unordered pair of normalized texts, so that A>B and
    B>A meet under one key. The problem id is part of it so that what a batch yields never depends
    on which other problems share the batch (shards are written per batch; the job searches each
    problem content once)."""
    texts = frozenset((normalize_text(row["chosen"]), normalize_text(row["rejected"])))
    return row["problem_id"], row["prompt"], texts


def kto_key(row: dict) -> tuple[str, str, str]:
    """Identity of a KTO row: problem, prompt, normalized completion."""
    return row["problem_id"], row["prompt"], normalize_text(row["completion"])
