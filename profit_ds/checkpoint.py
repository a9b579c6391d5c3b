"""Checkpoints for exact resume: everything a run needs to continue as if never stopped.

What is saved is small (prompts, server optimizer state, finished metrics), so a checkpoint is
written after every round and after every finished personalization group. RNG states need no
saving: every random choice (client sampling, shuffles) is drawn from a generator keyed by
(seed, round, client, epoch), so a resumed run draws exactly what an uninterrupted one would.

Files are safetensors (no pickle) written atomically; the metadata carries the round, the
finished state (JSON), the config hash and the data manifest hash, and a SHA-256 over all of
them and every tensor's bytes: whatever a resume trusts is verified. A corrupted, truncated or
edited checkpoint is reported and the previous good one is used; if none is left, the resume
is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from profit_ds import io
from profit_ds.errors import UsageError

KEEP = 2
# options that change how a run executes, never what it computes
EXECUTION_ONLY = {"output_dir", "overwrite", "resume", "num_procs", "clients_in_parallel",
                  "eval_batch_size", "debug"}


def config_hash(config: dict) -> str:
    relevant = {k: v for k, v in config.items() if k not in EXECUTION_ONLY}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 of every metadata field (but the digest itself) and every tensor, each with
    its name, dtype and shape."""
    h = hashlib.sha256(b"profit-ds checkpoint v2\0")
    for key in sorted(k for k in meta if k != "sha256"):
        h.update(f"{key}\0{meta[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """The resumable state of a run after `round` rounds (and `groups_done` personalization
    groups, once training is over)."""

    round: int
    tensors: dict[str, torch.Tensor]
    state: dict = field(default_factory=dict)  # JSON-able: metrics so far, server step, ...


def save(directory: Path, ckpt: Checkpoint, cfg_hash: str, manifest_hash: str) -> Path:
    """Write `ckpt-<n>.safetensors` atomically; keep the newest KEEP checkpoints."""
    seq = 1 + max((_seq(p) for p in directory.glob("ckpt-*.safetensors")), default=0)
    path = directory / f"ckpt-{seq:06d}.safetensors"
    meta = {"round": str(ckpt.round), "config_hash": cfg_hash, "manifest_hash": manifest_hash,
            "state": json.dumps(ckpt.state, allow_nan=False)}
    meta["sha256"] = _digest(ckpt.tensors, meta)
    io.write_tensors(path, ckpt.tensors, meta)
    for old in sorted(directory.glob("ckpt-*.safetensors"), key=_seq)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def _seq(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _read(path: Path) -> tuple[Checkpoint, dict]:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if _digest(tensors, meta) != meta.get("sha256"):
        raise ValueError("its SHA-256 does not match its content")
    return Checkpoint(int(meta["round"]), tensors, json.loads(meta["state"])), meta


def load_latest(directory: Path, cfg_hash: str, manifest_hash: str,
                warn=print) -> Checkpoint | None:
    """The newest valid checkpoint, falling back past corrupted ones; None if there is none.

    A valid checkpoint of another config or data is refused: resuming it would silently mix
    two experiments. So is a resume with checkpoints none of which verifies, and one whose
    checkpoints are all gone while the run had started (it would restart silently).
    """
    paths = sorted(directory.glob("ckpt-*.safetensors"), key=_seq, reverse=True)
    if not paths:
        raise UsageError(f"--resume: no checkpoint in {directory} (deleted?); pass --overwrite "
                         "to start the run over")
    for path in paths:
        try:
            ckpt, meta = _read(path)
        except Exception as err:  # truncated header, bad JSON, hash mismatch: all "corrupted"
            warn(f"checkpoint {path} is corrupted ({str(err).splitlines()[0]}); "
                 "falling back to the previous one")
            continue
        if meta.get("config_hash") != cfg_hash:
            raise UsageError(f"--resume: {path} was written with a different config "
                             "(compare with config.json in the run directory)")
        if meta.get("manifest_hash") != manifest_hash:
            raise UsageError(f"--resume: {path} was written with different data "
                             "(the partition manifest hash differs)")
        return ckpt
    raise UsageError(f"--resume: no checkpoint in {directory} verifies (all corrupted or "
                     "edited); pass --overwrite to start the run over")
