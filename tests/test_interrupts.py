"""Ctrl-C during the launcher's loop is never lost: SIGINT is noted and raised where the loop checks."""

from __future__ import annotations

import signal
import sys

import pytest

from rewards.interrupts import deferred_sigint


class _SignalsInDel:
    """An object whose `__del__` runs Python code while a SIGINT arrives (as Ray's
    ObjectRefGenerator.__del__ does when the launcher drops a finished batch's generator)."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # to this thread: the handler runs before this returns


def test_a_sigint_inside_a_del_is_lost_without_the_guard(monkeypatch):
    """The hazard itself: KeyboardInterrupt raised inside __del__ goes to sys.unraisablehook
    ("Exception ignored in ...") and this frame runs on."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        obj = _SignalsInDel()
        del obj  # no KeyboardInterrupt reaches this frame
    finally:
        signal.signal(signal.SIGINT, before)
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
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with deferred_sigint() as quiet:
        pass
    assert not quiet.caught and signal.getsignal(signal.SIGINT) is before
