"""Small durable-write helpers shared by the writer, the manifest and the sync ledger."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, fsync: bool = True,
                 tmp_name: str | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.
    `tmp_name` names the temporary file when readers of the directory must not mistake it for
    a finished one (TensorBoard reads any file with 'tfevents' in its name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp_name is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        tmp = str(path.parent / tmp_name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: Path, obj: Any, fsync: bool = True) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), fsync)


def open_regular(path: Path | str) -> int:
    """A read-only descriptor of `path`, which must be a regular file. A journal is untrusted:
    a file of it linked to /dev/zero or made a FIFO would make a reader wait or read for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_bytes(path: Path | str) -> bytes:
    """The bytes of a regular file (see `open_regular`)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_json(path: Path | str) -> Any:
    """A small JSON file, which must be a regular file (see `open_regular`). `itwinai-sync ls`
    reads one manifest per rank, thousands of them: os.open/os.read cost a third of open(),
    whose buffering and text layer buy nothing here, and the size fstat gives (needed anyway
    to refuse what is not a regular file) lets one read(2) take the whole file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:  # it grew since fstat: read the rest
            chunks = [data]
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return json.loads(data)
