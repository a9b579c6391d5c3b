"""An output directory belongs to one run at a time.

Two runs on one `--output-dir` would interleave their files (the results of one, the config of
the other, metrics and checkpoints of both). A run holds an exclusive `flock` on
`OUTPUT_DIR/.profit-ds.lock` for as long as it works there; the kernel releases it when the
process ends however it ends, so a crashed or killed run leaves no lock to clear by hand, and
the next run takes the directory over. A second run while the first is alive is refused in one
line naming the holder. Once a run holds the directory, temporary files that killed writes
left there (`.NAME.*.tmp`, see `io`) are no one's and are removed.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from profit_ds.errors import UsageError

LOCK = ".profit-ds.lock"


@contextmanager
def own_directory(out: Path, flag: str = "--output-dir") -> Iterator[None]:
    """Hold `out` for the duration (creating it); UsageError if a live run holds it.

    The lock file is removed when the run lets go, so a run that was refused, or failed,
    leaves the directory as it found it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {out}: cannot write there ({err.strerror})") from None
    f = _lock(out / LOCK, flag, out)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        _remove_stale_temporaries(out)
        yield
    finally:
        # Unlinked while still held: a process that opened the old file before this and then
        # gets its lock sees that the path no longer names that file, and starts over.
        (out / LOCK).unlink(missing_ok=True)
        f.close()


def _lock(path: Path, flag: str, out: Path) -> TextIO:
    """The open lock file, exclusively locked, and still the file `path` names."""
    while True:
        try:
            f = path.open("a+", encoding="utf-8")
        except OSError as err:
            raise UsageError(f"{flag} {out}: cannot write there ({err.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UsageError(f"{flag} {out}: in use by another profit-ds run ({holder}); wait "
                             "for it, or choose another directory") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # the holder let go and removed it in between: take the new one


@contextmanager
def held_by_this_run(out: Path, flag: str = "--output-dir") -> Iterator[None]:
    """`own_directory` for an SPMD run: rank 0 holds the lock, and every rank learns whether
    it got it (all raise the same refusal), so no rank goes on alone."""
    from profit_ds import distributed

    if "WORLD_SIZE" not in os.environ:  # one process, no launcher: refuse before any set-up
        with own_directory(out, flag):
            distributed.setup()
            yield
        return
    distributed.setup()
    with ExitStack() as owned:
        refused = None
        if distributed.is_main():
            try:
                owned.enter_context(own_directory(out, flag))
            except UsageError as err:
                refused = err
        if not distributed.all_true(refused is None):
            raise refused or UsageError(f"{flag} {out}: refused (see rank 0)")
        yield


def _remove_stale_temporaries(out: Path) -> None:
    for tmp in out.rglob(".*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass
