"""Ctrl-C during the launcher's loop is never lost: SIGINT is noted and raised where the loop checks."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from rewards.interrupts import deferred_sigint


class _SignalsInDel:
    """An object whose `__del__` runs Python code while a SIGINT arrives (as Ray's
    ObjectRefGenerator.__del__ does when the launcher drops a finished batch's generator)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10_000))  # bytecode after the signal: Python runs the handler here


def test_a_sigint_inside_a_del_is_lost_without_the_guard(monkeypatch):
    """The hazard itself: KeyboardInterrupt raised inside __del__ goes to sys.unraisablehook
    ("Exception ignored in ...") and this frame runs on."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    obj = _SignalsInDel()
    del obj  # no KeyboardInterrupt reaches this frame
    assert dropped == [KeyboardInterrupt]


def test_a_sigint_inside_a_del_is_raised_at_the_next_check():
    with pytest.raises(KeyboardInterrupt), deferred_sigint() as interrupts:
        obj = _SignalsInDel()
        del obj
        assert interrupts.caught, "noted, not raised inside __del__"
        interrupts.check()
        raise AssertionError("check() must raise")


def test_a_sigint_never_checked_is_raised_when_the_block_ends_and_the_handler_comes_back():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), deferred_sigint():
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10_000))
    assert signal.getsignal(signal.SIGINT) is before
    with deferred_sigint() as quiet:
        pass
    assert not quiet.caught and signal.getsignal(signal.SIGINT) is before
