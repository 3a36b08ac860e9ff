"""A per-test time bound for the suites (setup, call and teardown each).

A suite test that waits on the guest forever (a command whose SSH channel a
stray guest process holds open, a server that missed its signal) would hold
the whole ``invoke test`` run until an outer timeout kills it, and with it
every later test's verdict. The watchdog turns such a hang into one failed
test that says which phase ran over and for how long; the run goes on.

SIGALRM in pytest's main thread (where the tests run): the exception raised
from the handler unwinds the test like any other and pytest reports it.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

ENV = "NFLAB_TEST_TIMEOUT"
DEFAULT = 300.0     # seconds per phase: a TCG guest on a loaded host needs ~100 at most


class PhaseTimeout(Exception):
    """A test phase ran over the watchdog's bound."""


def bound_from(value) -> float:
    """Seconds from ``--nflab-test-timeout`` / ``$NFLAB_TEST_TIMEOUT``; 0 turns it off."""
    raw = value if value not in (None, "") else os.environ.get(ENV, DEFAULT)
    try:
        seconds = float(raw)
    except ValueError:
        raise pytest.UsageError(f"--nflab-test-timeout={raw!r} is not a number of seconds "
                                "(use e.g. 300, or 0 for no bound)") from None
    return max(seconds, 0.0)


class Watchdog:
    """pytest plugin object: arms a one-shot SIGALRM around each test phase."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def _armed(self, phase: str):
        if not self.seconds or threading.current_thread() is not threading.main_thread():
            return None

        def expire(signum, frame):
            raise PhaseTimeout(f"test {phase} ran over {self.seconds:g} s (nflab watchdog, "
                               f"--nflab-test-timeout / ${ENV}): a guest command or a wait "
                               "that never ends")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return previous

    @staticmethod
    def _disarm(previous):
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def _bounded(self, phase: str):
        previous = self._armed(phase)
        try:
            return (yield)
        finally:
            self._disarm(previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item):
        return (yield from self._bounded("setup"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        return (yield from self._bounded("call"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        return (yield from self._bounded("teardown"))
