"""The one atomic file writer of the project, and JSON / JSON-lines helpers built on it.

Everything the project writes for a user to keep (shards, indexes, CSVs, run outputs, PNGs) goes
through ``atomic_write``: a temp file in the target directory, fsync, then ``os.replace``, so a
reader or a crash never sees half a file. ``hilt_scale`` and ``hilt_kernels`` import it from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on clean exit fsync and rename it to ``path``.

    ``mode`` is "w" (text) or "wb" (bytes). On any exception the temp file is removed and
    ``path`` is left as it was. ``f.name`` is the temp file's path (for writers that need a name).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=encoding if text else None, newline="" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines to ``path`` atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a line that is not UTF-8 or not JSON raises ValueError naming file and line."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from exc
    return rows


def lock_dir(path: str | Path, who: str) -> int:
    """Take an exclusive lock on directory ``path`` (its ``.lock`` file) for this process; return
    the open descriptor (the lock lasts until it is closed or the process ends).

    Non-blocking: when another process holds it, RuntimeError names the directory and that
    process, so two writers or two trainers never interleave their files in one place.
    """
    import fcntl

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RuntimeError(
            f"{path} is in use by {holder}: wait for it to finish or use another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{who} (pid {os.getpid()})\n".encode(), 0)
    return fd
