"""GGUF checkpoints as backbones: converted once into a cached Hugging Face folder.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`) by dequantizing every
tensor, about half a minute for a 135M model and proportionally more for larger ones, and the
model it returns refuses `save_pretrained`. So the first load converts the file into a plain
folder (config, fp32 safetensors, tokenizer with its chat template) under
`$PROFIT_DS_CACHE/models/`, written to a temporary folder and renamed into place, with a
manifest of every file's size and SHA-256. Later loads read that folder in seconds after
checking it against the manifest (a file cut short or edited is converted again, said so).

Quantized weights (Q4_1, Q8_0, ...) are dequantized to fp32: the backbone is the quantized
model, not the original bf16 one, and scores on it are not the original model's.

Several ranks (or runs) may start on the same file at once: the conversion holds an exclusive
`flock` on a lock file next to the cache folder, which the kernel releases when its holder
dies, so a killed conversion never leaves a lock others wait on.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from profit_ds.cache import cache_dir
from profit_ds.errors import UsageError

MANIFEST = "profit-ds-gguf.json"
FORMAT = "gguf-hf-v1"  # bump when the conversion changes


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def converted_folder(gguf_path: Path) -> Path:
    """The cache folder of a GGUF file: keyed by its path, size and modification time, so a
    replaced file gets a new conversion."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{FORMAT}\0{gguf_path.resolve()}\0{stat.st_size}\0"
                         f"{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


def hf_folder(gguf_path: Path, say: Callable[[str], None] | None = None) -> Path:
    """A Hugging Face folder with the weights, config and tokenizer of `gguf_path`: the
    cached conversion if it checks out, else a new one (`say` gets a line before and after)."""
    say = say or (lambda line: print(line, file=sys.stderr))
    folder = converted_folder(gguf_path)
    if _intact(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.with_name(folder.name + ".lock")):
        if _intact(folder):  # another process converted it while we waited
            return folder
        if folder.exists():
            say(f"{folder}: cached conversion incomplete or changed; converting again")
            shutil.rmtree(folder)
        say(f"converting {gguf_path.name} to a cached Hugging Face folder (once; "
            "quantized weights are dequantized to fp32) ...")
        t = time.perf_counter()
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert(gguf_path, tmp)
        _write_manifest(tmp, gguf_path)
        tmp.rename(folder)
        say(f"converted in {time.perf_counter() - t:.0f}s: {folder}")
    return folder


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize with transformers and save the plain model; its own progress bar shows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from profit_ds.model.ds_config import import_deepspeed

    import_deepspeed()  # transformers imports it while loading: first our way (quiet, CPU named)
    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype="float32")
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise UsageError(f"--model {gguf_path}: transformers cannot read this GGUF file "
                         f"({str(err).splitlines()[0]})") from None
    # what made save_pretrained refuse: the model is plain fp32 tensors now
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(folder: Path, source: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "source": str(source),
                                               "files": files}, indent=1), encoding="utf-8")


def _intact(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion whose files match its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        return manifest["format"] == FORMAT and all(
            (folder / name).stat().st_size == meta["size"] and
            _sha256(folder / name) == meta["sha256"] for name, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """An exclusive flock on `lock`: released by the kernel if its holder dies."""
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
