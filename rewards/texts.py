"""The texts records are made of, and the keys that find duplicate records.

A prefix is the prompt and every step so far, each followed by the separator, as the policy
conditioned on it; a completion is steps, each followed by the separator, as the policy ends its
own steps (TRL appends EOS after it). Keys compare texts whitespace-insensitively.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mcts.finished import FinishedTree


def prefix_text(tree: FinishedTree, node: int) -> str:
    """The text the policy conditioned on at `node`: the prompt and each step followed by the tree's
    separator."""
    return tree.prompt + completion_text(tree, tree.path(node))


def completion_text(tree: FinishedTree, nodes: list[int]) -> str:
    """The steps of `nodes`, each ended by the tree's separator as the policy ends every step of its
    own solutions (TRL appends EOS after it)."""
    return "".join(tree.steps[i] + tree.separator for i in nodes)


def text_steps(tree: FinishedTree, prefix: str, completion: str) -> list[str] | None:
    """The steps an exported (prefix, completion) holds under `tree`'s prompt and separator: the
    inverse of `prefix_text` + `completion_text`. None when the text is not the tree's prompt
    followed by separator-ended steps."""
    text = prefix + completion
    if not text.startswith(tree.prompt) or not text.endswith(tree.separator):
        return None
    return text[len(tree.prompt) :].split(tree.separator)[:-1]


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
