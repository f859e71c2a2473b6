"""Small durable-write helpers shared by the writer, the manifest and the sync ledger: atomic
writes, temporary files with the permissions the umask gives, and the exclusive lock of a
directory that still works on filesystems without flock."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itwinai_journal.errors import ItwinaiSyncError

if TYPE_CHECKING:
    import filelock

#: errno values with which a filesystem says it has no flock: Lustre mounted `noflock` (ENOSYS),
#: NFS without a lock manager (ENOLCK), some FUSE filesystems (EOPNOTSUPP).
NO_FLOCK = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP})
_warned_no_flock = False


class JournalWriteError(ItwinaiSyncError, OSError):
    """Raised by a strict writer when records cannot be written, and by the blob store when it
    cannot store a payload (the logger counts that record as dropped, or raises when strict)."""


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


def create_temp(directory: Path | str, prefix: str, suffix: str = "") -> tuple[int, str]:
    """A new file opened for writing under a random name, as `tempfile.mkstemp` makes one, but
    created with the permissions the umask (and a directory's default ACL) give: mkstemp's files
    are 0600, and once renamed into place collaborators on a shared project space could not read
    them. Returns (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))


def write_atomic(path: Path, data: bytes, fsync: bool = True,
                 tmp_name: str | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.
    `tmp_name` names the temporary file when readers of the directory must not mistake it for
    a finished one (TensorBoard reads any file with 'tfevents' in its name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp_name is None:
        fd, tmp = create_temp(path.parent, f".{path.name}.", ".tmp")
    else:
        tmp = str(path.parent / tmp_name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
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
    a file of it linked to /dev/zero or made a FIFO would make a reader wait or read for ever
    (O_NONBLOCK: opening a FIFO does not wait for a writer), a directory would fail later."""
    return _open_regular(path)[0]


def _open_regular(path: Path | str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd, st


def read_bytes(path: Path | str) -> bytes:
    """The bytes of a regular file (see `open_regular`)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_json(path: Path | str) -> Any:
    """A small JSON file, which must be a regular file (see `open_regular`). `itwinai-sync ls`
    reads one manifest per rank, thousands of them: os.open/os.read cost a third of open(),
    whose buffering and text layer buy nothing here, and the size fstat gives (needed anyway
    to refuse what is not a regular file) lets one read(2) take the whole file."""
    fd, st = _open_regular(path)
    try:
        size = st.st_size
        data = os.read(fd, size + 1)
        if len(data) > size:  # it grew since fstat: read the rest
            chunks = [data]
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return json.loads(data)


def lock_exclusively(path: Path, owner_file: Path) -> filelock.BaseFileLock:
    """Hold an exclusive lock for this process: flock on `path`, or, on a filesystem without
    flock, `owner_file` created with O_EXCL and holding this host and pid (filelock's
    SoftFileLock), taken over when that pid is gone on the same host. The fallback still
    refuses a second live holder; a holder on another host cannot be probed, so an owner file
    left by a process killed there must be removed by hand (the error says so).

    Returns the held lock (not thread-local: any thread may release it). Raises
    `filelock.Timeout` when another process holds it."""
    import filelock  # here: readers of a journal (`itwinai-sync ls`) do not need it

    global _warned_no_flock
    lock = filelock.FileLock(str(path), thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
        return lock
    except filelock.Timeout:
        raise
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        reason = e.strerror or errno.errorcode.get(e.errno or 0, "flock unavailable")
    if not _warned_no_flock:
        _warned_no_flock = True
        warnings.warn(
            f"itwinai-journal: the filesystem of {path.parent} has no flock ({reason}); the "
            f"writer lock falls back to an owner file ({owner_file.name}: host and pid, taken "
            "over once that process is gone on the same host)", RuntimeWarning, stacklevel=3)
    soft = filelock.SoftFileLock(str(owner_file), thread_local=False)
    soft.acquire(timeout=0)
    return soft
