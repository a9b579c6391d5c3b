"""User-facing errors.

Anything the user can fix (a bad flag, a malformed file, a missing path) raises `UsageError`
with a one-line message naming the file, field or flag. The CLI turns it into that line on
stderr and exit code 2; everything else is a bug and keeps its traceback. Two environmental
failures are also the user's to fix and get the same treatment: a full disk and running out of
memory (`explain`).
"""
from __future__ import annotations

import errno

OOM_ADVICE = ("lower --clients-in-parallel or --eval-batch-size, spread the backbone over more "
              "ranks (--num-procs / deepspeed --num_gpus), or offload parameters "
              "(--ds-config zero3_gpu_bf16_offload); `profit-ds plan` estimates the memory")


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (how clusters pre-empt a job), handled as Ctrl-C is: a checkpointed run says how
    to resume, and the exit code is 143 (128 + SIGTERM)."""

    exit_code = 143


def explain(err: BaseException) -> str | None:
    """A one-line message for an environmental failure the user can fix, or None."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" while writing {err.filename}" if err.filename else ""
        return f"no space left on device{where}: free some space or choose another --output-dir"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
            isinstance(err, RuntimeError) and "out of memory" in str(err).lower()):
        return f"out of memory: {OOM_ADVICE}"
    return None
