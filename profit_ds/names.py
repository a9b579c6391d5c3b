"""File names and keys for what the data names.

A client is named after its task (or `clientNNN`), and a task's name comes from the data: a
file name, or any string an `hf:` data set holds, such as `../../victim/model`, `a/b`, `.`, 300
characters, or two names that differ only in case (one file on a case-insensitive disk). None
of that may choose where a file goes or break a checkpoint key, so every such name becomes a
stem of its own: safe characters only, bounded, unique, and the same for the same name on
every run (it depends on the name alone). Runs record the mapping (`clients/index.json`).
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable

MAX_STEM = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_stems(names: Iterable[str]) -> dict[str, str]:
    """name -> its file stem: letters, digits, `.`, `_` and `-` kept, anything else `_`, no
    leading dot, at most MAX_STEM characters. A name that had to change, or whose stem another
    name shares ignoring case, gets `-` and 8 hex digits of its SHA-256 appended."""
    names = list(dict.fromkeys(names))
    clean = {n: _UNSAFE.sub("_", n).lstrip(".")[:MAX_STEM] for n in names}
    folded: dict[str, int] = {}
    for stem in clean.values():
        folded[stem.casefold()] = folded.get(stem.casefold(), 0) + 1
    out = {}
    for name, stem in clean.items():
        if stem != name or not stem or folded[stem.casefold()] > 1:
            digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            stem = f"{stem[:MAX_STEM - 9]}-{digest}" if stem else digest
        out[name] = stem
    return out
