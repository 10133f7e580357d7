"""Atomic file writes and safe checkpoint loading: what other runs depend on is never half-written.

A write that fails (disk full, file too large, no permission) raises WriteError naming the file,
and leaves the file as it was before.
"""
from __future__ import annotations

import ctypes
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class WriteError(OSError):
    """A file could not be written: WriteError(errno, reason, path); str() names the file and the
    system's reason."""

    @classmethod
    def of(cls, path, error: OSError) -> "WriteError":
        return cls(error.errno, error.strerror or str(error), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class _KeepWriteError:
    """A file object that remembers the first OSError its writes raised: torch.save reports a
    failed write as a RuntimeError ("unexpected pos ...") that names neither the file nor why."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):  # everything else is the file's own
        return getattr(self.f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb",
                 durable: bool = True) -> None:
    """Write via `write(fileobj)` to a temporary file beside `path`, fsync, then rename over it.
    Any failure removes the temporary file; an OSError (of the write, or inside `write`) is raised
    as WriteError naming `path`. durable=False: no fsync of the file or its directory (still
    all or nothing for every reader and for a killed writer; a power loss may lose it): for files
    written every few steps whose durability a later fsynced file vouches for after
    `sync_file_system` (RunDir.make_durable)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            kept = _KeepWriteError(f)
            try:
                write(kept)
            except Exception as e:
                if kept.error is not None and not isinstance(e, OSError):
                    raise kept.error from e
                raise
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if not durable:
            return
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError.of(path, e) from e
        raise


def sync_file_system(path: str | os.PathLike) -> None:
    """Every file written so far to the file system holding `path` on disk: syncfs(2), or sync(2)
    (every file system) where the C library has no syncfs. Not sync(2) throughout: on a shared
    machine that waits for every other user's writes too. A failure raises WriteError naming
    `path`."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise WriteError.of(path, e) from e
    try:
        if syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise WriteError(errno, os.strerror(errno), str(path))
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def append_jsonl(path, obj, durable: bool = True) -> None:
    """Append one JSON line and fsync it (metrics.jsonl is append-only; a torn last line is ignored
    on read). A failed append is cut off again, so the file ends where it did, and raises WriteError.
    durable=False: no fsync (as atomic_write's)."""
    path = Path(path)
    line = (json.dumps(obj, sort_keys=True) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError.of(path, e) from e
    try:
        end = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the torn line is then skipped on read, and rewritten by --resume
            raise WriteError.of(path, e) from e
    finally:
        os.close(fd)


def read_jsonl(path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is not trusted
    return rows


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint that can never run code (weights_only=True)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {e})") from e
