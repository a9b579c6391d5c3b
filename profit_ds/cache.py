"""Where profit-ds keeps what it derives once and reuses (SNI's Arrow cache, models converted
from GGUF): `$PROFIT_DS_CACHE`, else `~/.cache/profit-ds`, one place to delete to drop them all."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PROFIT_DS_CACHE", Path.home() / ".cache" / "profit-ds"))
