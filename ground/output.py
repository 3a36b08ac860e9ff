"""Helpers shared by the invoke task modules: clean errors, output, progress."""

from __future__ import annotations

import functools
import os
import sys

from invoke import Exit

from ground.errors import NflabError


def quiet_wanted(quiet: bool = False) -> bool:
    return quiet or bool(os.environ.get("CI")) or not sys.stderr.isatty()


def friendly(func):
    """Turn NflabError into one clear line (plus detail) and the error's exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NflabError as exc:
            if exc.detail:
                print(exc.detail, file=sys.stderr)
            print(f"error: {exc}", file=sys.stderr)
            raise Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise Exit(code=130) from None

    return wrapper


def table(headers, rows, title=None):
    """Print a table: rich on a terminal, plain aligned text otherwise."""
    rows = [[str(c) for c in r] for r in rows]
    if sys.stdout.isatty():
        try:    # optional dependency: without rich, plain aligned text
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            t = Table(title=title)
            for h in headers:
                t.add_column(h)
            for r in rows:
                t.add_row(*r)
            Console().print(t)
            return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


class Progress:
    """Step messages on stderr; a rich status spinner on a terminal, plain lines in CI.

    Reporting never stops the work: once the reader of stderr has gone (``invoke
    test 2>&1 | head``), messages are dropped, so a task still stops the VMs it
    booted instead of dying on the broken pipe in its clean-up."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet_wanted(quiet)
        self._status = None
        self._reader_gone = False
        if not self.quiet:
            try:    # optional dependency: without rich, plain lines
                from rich.console import Console
                self._console = Console(stderr=True)
            except ImportError:
                self._console = None

    def __call__(self, message: str):
        if self._reader_gone:
            return
        try:
            self._show(message)
        except BrokenPipeError:
            self._lose_reader()

    def _show(self, message: str):
        if self.quiet or self._console is None:
            print(f"nflab: {message}", file=sys.stderr, flush=True)
        elif self._status is None:
            self._status = self._console.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def done(self):
        if self._status is not None:
            try:
                self._status.stop()
            except BrokenPipeError:
                self._lose_reader()
            self._status = None

    def _lose_reader(self):
        """stderr's reader is gone: drop what is buffered for it, and point the
        descriptor at /dev/null so no later write (an error line, Python's own
        flush at exit) fails again."""
        self._reader_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.done()
