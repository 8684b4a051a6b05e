"""Atomic file output: a reader either sees the old file or the complete new one, never a torn write.

Everything the pipeline writes goes through here: data is written to a temporary file in the target
directory, flushed to disk, then renamed over the target (rename is atomic on POSIX filesystems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_file(path: str | Path, block_size: int = 1 << 23) -> str:
    """Hex sha256 of a file, read in blocks so large files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """`$REFUSAL_SAE_CACHE`, else `$XDG_CACHE_HOME/refusal_sae`, else `~/.cache/refusal_sae`."""
    if os.environ.get("REFUSAL_SAE_CACHE"):
        return Path(os.environ["REFUSAL_SAE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "refusal_sae"
    return Path.home() / ".cache" / "refusal_sae"
