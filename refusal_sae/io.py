"""Atomic file output, typed JSON and directory locks: a reader never sees a torn write, a record reads back as
the dataclass it was written from, and two runs never write one directory at once.

Everything the pipeline writes goes through `atomic_open`: data is written to a temporary file in the
target directory, flushed to disk, then renamed over the target (rename is atomic on POSIX filesystems).
Records are dataclasses written as key-sorted JSON (`to_json`, `write_json`) and read back typed (`from_json`).
A run directory or activation cache being written is held with `hold_directory` / `directory_lock`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from refusal_sae.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Directories this process holds: resolved path -> (lock file descriptor, pid of the process that took it).
_held: dict[Path, tuple[int, int]] = {}
# Directories this process reads under a shared lock (`hold_shared`): resolved path -> lock file descriptor.
_shared: dict[Path, int] = {}


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; rename it onto `path` only if the block succeeds.

    The file gets the mode any new file gets (0666 less the umask), like the files numpy and Lightning write
    beside it; `tempfile.mkstemp` would make it private (0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
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


def to_json(obj: Any) -> Any:
    """Dataclasses, numpy scalars and NaN (as null) to plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def from_json(cls: Any, data: Any) -> Any:
    """The inverse of `to_json` for a type `cls` (dataclasses, list/dict/Optional of them, plain values)."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(cls) if a is not type(None)]
        if data is None:
            return None
        return from_json(options[0], data)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: from_json(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)
                      if f.name in data})
    if origin is list:
        return [from_json(typing.get_args(cls)[0], v) for v in data]
    if origin is dict:
        return {k: from_json(typing.get_args(cls)[1], v) for k, v in data.items()}
    if cls is float:
        return float("nan") if data is None else float(data)
    return data


def md_cell(text: object) -> str:
    """`text` as one markdown table cell: a `|` escaped, line breaks as spaces (a category name holding either would
    otherwise break the table's columns or rows)."""
    return " ".join(str(text).split("\n")).replace("\r", " ").replace("|", "\\|")


def read_json(path: Path, what: str, how: str) -> Any:
    """The JSON record at `path`; a UserError naming it, `what` is missing and `how` to make it, when it is absent
    or torn."""
    if not path.is_file():
        raise UserError(f"{path} not found: this analysis has no {what}; {how}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); {how}") from e


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


def hold_directory(directory: str | Path, what: str, option: str) -> None:
    """Lock `directory` for the rest of this process (see `directory_lock`); taking it again is a no-op."""
    key = Path(directory).resolve()
    if key not in _held and _acquire(key, what, option):
        atexit.register(_release, key)


@contextlib.contextmanager
def directory_lock(directory: str | Path, what: str, option: str) -> Iterator[None]:
    """Lock `directory` for the block, so no other process writes it meanwhile (a no-op if this one holds it).

    The lock is `fcntl.flock` on `<directory>/.lock`, which holds the owner's pid: another process asking
    for it stops at once with a UserError naming `what`, the directory, that pid and `option` (where to
    give another directory). The kernel drops a flock when its process dies, so a killed run never blocks
    the next one; the file is removed on release.
    """
    key = Path(directory).resolve()
    acquired = key not in _held and _acquire(key, what, option)
    try:
        yield
    finally:
        if acquired:
            _release(key)


def hold_shared(directory: str | Path, what: str, option: str) -> None:
    """Hold a shared lock on `directory` for the rest of this process, as a reader of it: any number of readers hold
    it together, and a writer (`directory_lock`, `hold_directory`) is refused while one does, as a reader is while a
    writer works, instead of rewriting files a reader has mapped. A no-op where this process holds it already."""
    key = Path(directory).resolve()
    if key in _shared or key in _held:
        return
    while True:
        fd = _open_lock(key, what, option)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{what} {key} is being written by another refusal_sae process (pid {holder}); wait for "
                            f"it to end, or give another {option}") from None
        except OSError as e:
            os.close(fd)
            log.warning("cannot lock %s %s (%s): a process rewriting it while this one reads would go unnoticed",
                        what, key, e.strerror or e)
            return
        if _is_current(fd, key / LOCK_FILE):
            _shared[key] = fd
            return
        os.close(fd)  # a writer removed the file between our open and flock: lock the new one


def _open_lock(directory: Path, what: str, option: str) -> int:
    """A descriptor of `<directory>/.lock`, created if needed, never through a symbolic link."""
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # the lock is written to: a link would have it write the link's target
            raise UserError(f"{path} is a symbolic link; a lock file never is: remove it (and check who made "
                            "it) before using this directory") from None
        raise UserError(f"{what} {directory} cannot be written ({e.strerror or e}); give a writable directory "
                        f"as {option}") from None


def _is_current(fd: int, path: Path) -> bool:
    """`fd` is the file at `path` (not one its last holder removed after we opened it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _acquire(directory: Path, what: str, option: str) -> bool:
    """Take the lock of `directory` into `_held`; False (after a warning) where the filesystem has no locks. A shared
    lock this process holds on it (as a reader) is given up first."""
    path = directory / LOCK_FILE
    if directory in _shared:
        os.close(_shared.pop(directory))
    while True:
        fd = _open_lock(directory, what, option)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()  # empty: readers only (hold_shared)
            os.close(fd)
            who = f"pid {holder}" if holder else "one or more reading it"
            raise UserError(f"{what} {directory} is in use by another refusal_sae process ({who}); wait for it to end "
                            f"or stop it, or give another {option}") from None
        except OSError as e:  # e.g. a network filesystem mounted without lock support
            os.close(fd)
            log.warning("cannot lock %s %s (%s): another process writing it at the same time would go unnoticed",
                        what, directory, e.strerror or e)
            return False
        if _is_current(fd, path):
            break
        os.close(fd)  # its last holder removed the file between our open and flock: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[directory] = (fd, os.getpid())
    return True


def _release(directory: Path) -> None:
    """Remove the lock file, then unlock; only in the process that took the lock (not in a forked worker)."""
    fd, pid = _held.get(directory, (-1, -1))
    if pid != os.getpid():
        return
    del _held[directory]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / LOCK_FILE)
    os.close(fd)
