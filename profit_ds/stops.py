"""Ctrl-C and SIGTERM: received once, raised where the program can handle them, exit 130 / 143.

Python raises KeyboardInterrupt in whatever code runs when the signal lands. During an import
(start-up, and the lazy imports of torch and transformers) or a finalizer that can be a place
nobody can handle it: a weakref callback inside importlib or a `__del__` (the error is printed
and ignored, and the run goes on as if Ctrl-C never came), module code that torch's C++ called
(std::terminate: exit -6), or an exec'd string (dataclasses build methods that way; CPython then
ends the process by SIGINT whatever caught the error). So a stop that lands inside an import or
a finalizer is asked for again shortly, until it lands outside one (for 10 s at most, so a hung
import stays stoppable). Only the standard library here: `python -m profit_ds` installs the
handler before it imports anything else.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
import types
import typing

from profit_ds.errors import Terminated

RECEIVED: list[KeyboardInterrupt] = []  # the stops raised so far, latest last
RETRY_S = 0.05  # how soon a stop that landed in an import or finalizer is asked for again
DEFER_MAX_S = 10.0  # and for how long at most: an import that hangs must still be stoppable
_deferred_since: float | None = None  # when the stop now asked for again first landed


def _unsafe(frame: types.FrameType | None) -> bool:
    """Whether `frame` runs inside an import (importlib is one of its callers) or a finalizer
    (`__del__`: Python prints an error raised there and ignores it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib") or \
                frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _handle(signum: int, frame: types.FrameType | None) -> None:
    """Raise KeyboardInterrupt (SIGTERM: `Terminated`), remembered: a library that swallows
    one fails later for no reason of its own, and `latest` tells why."""
    global _deferred_since
    if _unsafe(frame):
        if _deferred_since is None:
            _deferred_since = time.monotonic()
        if time.monotonic() - _deferred_since < DEFER_MAX_S:
            again = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
    _deferred_since = None
    RECEIVED.append(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())
    raise RECEIVED[-1]


def install() -> None:
    """Handle Ctrl-C and SIGTERM as above (main thread only, as `signal` requires)."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


def latest() -> KeyboardInterrupt | None:
    """The last stop raised, if any."""
    return RECEIVED[-1] if RECEIVED else None


def exit_stopped(code: int) -> typing.NoReturn:
    """End the process with `code` (130 after Ctrl-C, 143 after SIGTERM) once the exit handlers
    have run. Not `sys.exit`: CPython marks a KeyboardInterrupt that unwound through an exec'd
    string as unhandled, even when it was caught later, and then ends the process by SIGINT."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
