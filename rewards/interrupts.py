"""Ctrl-C that cannot be lost: SIGINT noted by a flag, raised as KeyboardInterrupt where the caller checks.

Python raises KeyboardInterrupt in whatever code the main thread runs when the signal arrives. If
that code is a `__del__` method, the exception is printed ("Exception ignored in ...") and dropped,
and the program runs on. Ray's `ObjectRefGenerator.__del__` is Python code, and the launcher's loop
drops a generator for every batch it finishes. In CI a Ctrl-C landed in one, and the job ran to
its end, exit 0.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupts:
    """A SIGINT handler that only notes the signal; `check()` raises it where raising is safe."""

    def __init__(self) -> None:
        self.caught = False

    def __call__(self, signum, frame) -> None:
        self.caught = True

    def check(self) -> None:
        if self.caught:
            raise KeyboardInterrupt


@contextmanager
def deferred_sigint() -> Iterator[Interrupts]:
    """While the block runs, SIGINT (and SIGTERM) only sets `Interrupts.caught`; the block calls `check()` at its
    own safe points, and a signal not yet raised is raised when the block ends. Off the main thread
    (where no handler can be set), a flag that never sets."""
    flag = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    before = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    flag.check()


def terminate_as_interrupt() -> None:
    """SIGTERM (how Slurm, Kubernetes and systemd stop a job) ends a command as Ctrl-C does: one
    line, metrics.json "interrupted", what was finished kept. Set again after `ray.init`, whose
    driver puts in a handler of its own that aborts the process with a C++ stack dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
