"""Content-addressed payload store: `blobs/ab/abcdef...`, named by the sha256 of the bytes.

A reference read from a journal is checked before it names a file (`validate.check_blob_ref`):
a record whose `blob` is `../../etc/hostname` never reaches the file system. A blob that is a
symbolic link is refused too: the writer never makes one, and following it would hand a file
from elsewhere to a tracker.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .fsio import JournalWriteError, create_temp, open_regular, read_bytes
from .validate import JournalCorruption, check_blob_ref, check_tree

CHUNK = 1 << 20
TMP_PREFIX = ".tmp-"


class BlobStore:
    """Write-once store; identical payloads are stored once, writes are atomic renames.

    A payload the store cannot write (disk full, quota, read-only filesystem) raises
    `JournalWriteError` and leaves no temporary file behind; an error reading a caller's file
    is the caller's and propagates unchanged."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, sha: str) -> Path:
        """Where blob `sha` lives; `sha` must be a sha256 and the file must not be a link."""
        check_blob_ref(sha, str(self.root))
        path = self.root / sha[:2] / sha
        if os.path.islink(path):
            raise JournalCorruption(f"{path}: a blob is a symbolic link; refused")
        return path

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.path(sha).exists():
            return sha
        tmp = _Payload(self)
        try:
            tmp.write(data)
            return tmp.commit(sha)
        finally:
            tmp.discard()

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy `src` in, streaming, hashing while copying; returns (sha256, size)."""
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as f:
            tmp = _Payload(self)
            try:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    tmp.write(chunk)
                    size += len(chunk)
                return tmp.commit(h.hexdigest()), size
            finally:
                tmp.discard()

    def put_tree(self, src: Path) -> tuple[str, int]:
        """Store every file below directory `src` and a JSON listing of them; returns the
        listing's sha256 and the number of files. The listing keeps the directory structure."""
        files = []
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            sha, size = self.put_file(path)
            files.append({"path": path.relative_to(src).as_posix(), "sha256": sha, "size": size})
        listing = json.dumps({"files": files}, sort_keys=True).encode()
        return self.put_bytes(listing), len(files)

    def remove_temporaries(self) -> None:
        """Remove the temporary files of payloads a killed process was writing. Only for the
        holder of the rank: no other process writes this store then."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(self.root / name)
                except OSError:
                    pass

    def open(self, sha: str):
        return os.fdopen(open_regular(self.path(sha)), "rb")

    def read(self, sha: str) -> bytes:
        return read_bytes(self.path(sha))

    def tree(self, sha: str) -> list[dict[str, Any]]:
        """The files of a directory stored by `put_tree` (path, sha256, size), each path checked
        to stay inside the tree and each reference to be a sha256."""
        try:
            listing = json.loads(self.read(sha))
        except ValueError as e:
            raise JournalCorruption(f"{self.root}: blob {sha} is not a directory listing") from e
        return check_tree(listing, f"{self.root}/{sha[:2]}/{sha}")


class _Payload:
    """One payload being stored: a temporary file in the store, renamed to its sha256 name by
    `commit`; `discard` removes it unless committed. The store's own OSErrors become
    JournalWriteError."""

    def __init__(self, store: BlobStore):
        self.store = store
        self.path: str | None = None
        try:
            store.root.mkdir(parents=True, exist_ok=True)
            fd, self.path = create_temp(store.root, TMP_PREFIX)
        except OSError as e:
            raise self._error(e) from e
        self.file = os.fdopen(fd, "wb")

    def _error(self, e: OSError) -> JournalWriteError:
        return JournalWriteError(e.errno, f"cannot store a payload in {self.store.root}: "
                                          f"{e.strerror or e}")

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            raise self._error(e) from e

    def commit(self, sha: str) -> str:
        dest = self.store.path(sha)
        try:
            self.file.close()
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, dest)
                self.path = None
        except OSError as e:
            raise self._error(e) from e
        return sha

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
