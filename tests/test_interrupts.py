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


def test_ctrl_c_while_the_settings_are_checked_is_one_line(monkeypatch, tmp_path, capsys):
    """An `except` clause whose tuple is built by importing (torch, via the critics) ran while a
    Ctrl-C unwound a half-done import of torch, and raised that import's error in its place: the
    error types are gathered before the settings are checked."""
    from rewards import cli, pipeline

    errors = cli._input_errors

    def gathered_before():
        if sys.exc_info()[0] is not None:
            raise ImportError("partially initialized module 'torch'")  # what the re-import raised
        return errors()

    def interrupted(conf):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_input_errors", gathered_before)
    monkeypatch.setattr(pipeline, "check_config", interrupted)
    assert cli.main(["search", f"out={tmp_path / 'out'}"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "arborist: interrupted: rerun the same command to resume"
    ]


def test_sigterm_ends_a_command_as_ctrl_c_does_and_waits_like_it_inside_the_stream():
    """Slurm, Kubernetes and systemd stop a job with SIGTERM: it must end as Ctrl-C does (one line,
    "interrupted", finished shards kept), not as Ray's driver handler did (exit 15, or a C++ dump)."""
    from rewards.interrupts import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    try:
        terminate_as_interrupt()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt), deferred_sigint() as interrupts:
            signal.raise_signal(signal.SIGTERM)
            assert interrupts.caught  # noted, raised at the block's end
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
