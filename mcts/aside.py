"""A build step in a second process beside this one (the critics' trunk in
`rewards.critic_bootstrap`, a critic in `critics.train`), so the two cores of a small machine
each train something where two torch threads on one model buy only ~1.4x.

`threads_agree` says whether moving a build between thread counts may change any weight on this
machine. The second process is spawned (not forked from a process that already runs OpenMP
threads), runs on one torch thread until `more_threads()` lets it use its own count, and quits at
its next step (`SystemExit`, so the `finally` of what it runs removes its temporary directory)
when `stop()` asks it to or when the process that started it is gone (a SIGKILLed job leaves no
trainer behind). What it runs takes a `step_hook(step)` keyword and calls it before every
optimizer step.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mcts.charlm import build_char_tokenizer, encode_pairs, tiny_llama_config
from mcts.embedded import TrainConfig, default_difficulty, training_texts


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity stands
    return cores


def threads_agree(train: TrainConfig, threads: int = 2, seed: int = 0) -> bool:
    """Whether this machine's kernels give the embedded model the same floats on one thread and on
    `threads`: the gradients of a training step of `train`'s shape and the logits of a forward pass
    without gradients, compared bit for bit. Where they agree, a build may change its thread count
    while it runs (`rewards.critic_bootstrap` runs two builds side by side, one core each) without
    changing the weights it ends with; where they do not, builds keep their recipe's count.
    A check on these shapes, not a proof for all: the builds' sha256 say the rest (docs)."""
    from transformers import LlamaForCausalLM

    tok = build_char_tokenizer()
    ids, labels = encode_pairs(training_texts(train.batch_size, seed, default_difficulty()), tok)
    before, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)

    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(
            tiny_llama_config(
                len(tok), train.d_model, train.n_layers, train.n_heads, max_len=ids.shape[1], tok=tok
            )
        )
    runs = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            runs.append([logits] + [p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det)
    return all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _run(target: Callable, args: tuple, threads: int, more, quit_, steps, parent_pid: int) -> None:
    now = [0]

    def step_hook(step: int) -> None:
        steps.value = step
        if quit_.is_set() or os.getppid() != parent_pid:
            raise SystemExit(1)
        want = threads if more.is_set() else 1
        if want != now[0]:
            now[0] = want
            torch.set_num_threads(want)

    torch.set_num_threads(1)
    target(*args, step_hook=step_hook)


class Aside:
    """`target(*args, step_hook=...)` in a spawned process on one torch thread (`threads` once
    `more_threads()` is called); `steps_done` is the step it is at."""

    def __init__(self, target: Callable, args: tuple, name: str, threads: int = 1):
        ctx = multiprocessing.get_context("spawn")
        self._more, self._quit, self._steps = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
        self.process = ctx.Process(
            target=_run,
            args=(target, args, threads, self._more, self._quit, self._steps, os.getpid()),
            name=name,
            daemon=True,
        )
        self.process.start()

    @property
    def steps_done(self) -> int:
        return self._steps.value

    def alive(self) -> bool:
        return self.process.is_alive()

    def more_threads(self) -> None:
        self._more.set()

    def wait(self, total: int | None = None, desc: str = "", progress: bool = False) -> bool:
        """Wait for it to end (showing its steps out of `total` when `progress`); True if it succeeded."""
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            while self.process.is_alive():
                self.process.join(timeout=1.0)
                bar.update(self.steps_done - bar.n)
            if self.process.exitcode == 0 and total is not None:
                bar.update(total - bar.n)
        return self.process.exitcode == 0

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask it to quit at its next step and wait; killed if it has not within `timeout_s`."""
        if self.process.is_alive():
            self._quit.set()
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
