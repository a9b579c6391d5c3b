"""Atomic writes (profit_ds/io.py): files get the mode a plain open() would give them."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from profit_ds import io


@pytest.fixture
def set_umask():
    """Set the process umask for one test; the old one is restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                        (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, set_umask, mask, mode):
    set_umask(mask)
    assert io.umask() == mask
    io.write_json(tmp_path / "results.json", {"a": 1})
    io.write_text(tmp_path / "sub" / "points.csv", "x\n")
    io.write_tensors(tmp_path / "prompt.safetensors", {"prompt": torch.zeros(2, 3)})
    for path in (tmp_path / "results.json", tmp_path / "sub" / "points.csv",
                 tmp_path / "prompt.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    # an overwrite too (os.replace puts the new file's mode in place)
    set_umask(0o022)
    io.write_json(tmp_path / "results.json", {"a": 2})
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp")), "no temp file left behind"


def test_umask_without_proc(monkeypatch, set_umask):
    """Where /proc/self/status cannot be read, the umask is still right and unchanged."""
    set_umask(0o027)
    real_open = open

    def no_proc(file, *args, **kw):
        if str(file) == "/proc/self/status":
            raise FileNotFoundError(file)
        return real_open(file, *args, **kw)
    monkeypatch.setattr("builtins.open", no_proc)
    assert io.umask() == 0o027
    assert io.umask() == 0o027
