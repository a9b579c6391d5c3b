"""Atomic file writes: temp file in the same directory, fsync, rename.

A crash or Ctrl-C mid-write leaves the previous version (or nothing), never half a file.
The file gets the mode a plain open() would create it with (0o666 less the umask), not
mkstemp's 0600: collaborators on a shared cluster must be able to read results.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: the
    `Umask:` line of /proc/self/status), so that no other thread creates a file under a
    temporary umask; elsewhere one os.umask pair, which sets it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Strict JSON: a NaN or infinity is a bug to surface here, not a file others can't read."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(contiguous, tmp, metadata=metadata)
        except Exception as err:  # safetensors reports a full disk in its own exception type
            if "os error 28" in str(err) or "No space left" in str(err):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
    _atomic(path, write)
