"""What produced a run's results: versions, the profit-ds commit, Python and the devices
(results.json's `environment`)."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

import torch

import profit_ds
from profit_ds import distributed


def environment() -> dict:
    """What produced the results: package versions (profit-ds itself included), the git
    commit of the profit-ds source and whether its package directory has uncommitted changes
    (None for both when it is not a git checkout), Python, and the devices: each visible
    GPU's name, else the CPU's model name, and the core count. Nothing here may fail a run."""
    def version(package: str) -> str | None:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True,
                                  timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    def cpu_model() -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    package = Path(profit_ds.__file__).resolve().parent
    source = package.parent
    commit = dirty = None
    # only when the package's parent is the checkout itself: an installed copy in a venv that
    # lies inside some other repository must not report that repository's commit
    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == source:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", package.name) if commit else None
        dirty = None if status is None else bool(status)
    versions = {"profit-ds": profit_ds.__version__,
                **{p: version(p) for p in ("torch", "deepspeed", "transformers", "peft",
                                           "accelerate", "rouge-score")},
                "cuda": torch.version.cuda}
    cuda = torch.cuda.is_available()
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if cuda else [cpu_model()])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"versions": versions, "commit": commit, "dirty": dirty,
            "python": platform.python_version(), "platform": platform.platform(),
            "world_size": distributed.world(), "device": "cuda" if cuda else "cpu",
            "devices": devices, "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable}
