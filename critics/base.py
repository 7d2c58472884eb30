"""The critic boundary: one small interface, the `critics` config group, and the set of critics the
search's expander calls.

A critic scores a batch of (problem, steps) pairs with one probability each:

| critic   | question it answers                                   | scores                        |
|----------|-------------------------------------------------------|-------------------------------|
| value    | how likely is this partial solution to end correct?   | [0, 1]                        |
| prm      | is the last step of this partial solution sound?      | [0, 1]                        |
| orm      | is this finished solution correct?                    | [0, 1]                        |
| verifier | the task's exact check (the external anchor)          | 1 / 0 at terminals, NaN else  |

`CriticSet` implements `mcts.expander.NodeCritics`: the expander hands it every new node of a search
round at once, and each learned critic runs one padded forward per `batch_size` chunk, never one
node at a time. The node value combines the parts as in AlphaLLM (`mcts.expander.combine`):
value = w_value * V + w_prm * PRM + w_orm * mean ORM(rollouts) (+ w_rollout * verified rollouts),
normalised by the weights of the parts that ran; at terminals the verifier decides when
`verifier_at_terminals`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from mcts.base import ExpandConfig, check_device_dtype
from mcts.tasks.base import Problem, Task

KINDS = ("value", "prm", "orm")
DEFAULT = "default"  # a *_path value meaning "the embedded critics of the built-in task"


@runtime_checkable
class Critic(Protocol):
    """Anything that scores (problem, steps) pairs; `steps[i]` are step texts without separators."""

    kind: str

    def score(self, problems: list[Problem], steps: list[list[str]]) -> np.ndarray:
        """One float per item, shape [n]: a probability in [0, 1] (NaN where the critic abstains)."""


@dataclass
class CriticsConfig(ExpandConfig):
    """Which critics to load, plus how node values combine them (`mcts.expander.ExpandConfig`'s
    fields). Hydra group `critics`."""

    value_path: str = DEFAULT
    """Value function directory (AutoModelForSequenceClassification, num_labels=1). "default": the
    embedded critic trained for the built-in task and default policy; "": off."""
    prm_path: str = DEFAULT
    """Process reward model directory (AutoModelForTokenClassification, num_labels=1, scores the
    separator token ending each step). "default" / "" as for value_path."""
    orm_path: str = DEFAULT
    """Outcome reward model directory (AutoModelForSequenceClassification, num_labels=1).
    "default" / "" as for value_path."""
    device: str = "cpu"
    """"cpu", "auto" (cuda if available, else cpu) or a torch device string. cpu: the embedded
    critics are a few MB, and a GPU launch per small batch costs more than their compute."""
    dtype: str = "float32"
    """"float32", "auto" (bfloat16/float16 on GPU, float32 on CPU), "bfloat16" or "float16"."""
    batch_size: int = 256
    """Most sequences per critic forward; a larger batch of nodes is split into chunks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"critics.batch_size must be >= 1, got {self.batch_size}")
        check_device_dtype("critics", self.device, self.dtype)

    def paths(self) -> dict[str, str]:
        return {"value": self.value_path, "prm": self.prm_path, "orm": self.orm_path}


class CriticSet:
    """The learned critics of one search (any of them may be absent), as `NodeCritics`.

    `score_nodes` runs the value function and the PRM over the same partial solutions (one batched
    pass each); `score_outcomes` runs the ORM over finished solutions. An absent critic yields NaN,
    which `combine` skips.
    """

    def __init__(self, value: Critic | None = None, prm: Critic | None = None, orm: Critic | None = None):
        self.value, self.prm, self.orm = value, prm, orm
        # value and PRM fine-tuned from one frozen trunk: one pass through it serves both
        self.shared_trunk = False
        if hasattr(value, "model") and hasattr(prm, "model"):
            from critics.models import shares_trunk

            self.shared_trunk = shares_trunk(prm, value)

    def __bool__(self) -> bool:
        return any(c is not None for c in (self.value, self.prm, self.orm))

    def score_nodes(self, problems: list[Problem], steps: list[list[str]]) -> dict[str, np.ndarray]:
        if self.shared_trunk:
            prm, value = self.prm.score_with(self.value, problems, steps)
            return {"value": value, "prm": prm}
        nan = np.full(len(problems), np.nan)
        return {
            "value": nan if self.value is None else self.value.score(problems, steps),
            "prm": nan.copy() if self.prm is None else self.prm.score(problems, steps),
        }

    def score_outcomes(self, problems: list[Problem], steps: list[list[str]]) -> np.ndarray:
        if self.orm is None:
            return np.full(len(problems), np.nan)
        return self.orm.score(problems, steps)

    @classmethod
    def load(cls, cfg: CriticsConfig, task: Task, default_dir: str | Path | None = None) -> CriticSet | None:
        """Load the configured critics; None when every path is "" (the expander then needs rollouts).

        A path of "default" resolves to `<default_dir>/<kind>` (see `rewards.critic_bootstrap`). Without a
        `default_dir` (the task or policy is not the built-in one, so the embedded critics cannot
        read its text) that critic is off, and a one-line note says so on stderr.
        """
        from critics.models import load_critic  # torch/transformers only when critics are used

        loaded: dict[str, Critic | None] = {}
        for kind, path in cfg.paths().items():
            if path == DEFAULT:
                if default_dir is None:
                    print(
                        f"arborist: critics.{kind}_path=default is off: the embedded critics only read the "
                        "built-in Countdown task with the default policy (set a directory to use one)",
                        file=sys.stderr,
                    )
                    loaded[kind] = None
                    continue
                path = str(Path(default_dir) / kind)
            loaded[kind] = (
                load_critic(path, kind, task, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size)
                if path
                else None
            )
        critics = cls(**loaded)
        return critics if critics else None
