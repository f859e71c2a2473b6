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
import tempfile
from pathlib import Path
from typing import Any

from .fsutil import open_regular, read_bytes
from .validate import JournalCorruption, check_blob_ref, check_tree

CHUNK = 1 << 20


class BlobStore:
    """Write-once store; identical payloads are stored once, writes are atomic renames."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, sha: str) -> Path:
        """Where blob `sha` lives; `sha` must be a sha256 and the file must not be a link."""
        check_blob_ref(sha, str(self.root))
        path = self.root / sha[:2] / sha
        if os.path.islink(path):
            raise JournalCorruption(f"{path}: a blob is a symbolic link; refused")
        return path

    def _commit(self, tmp: str, sha: str) -> str:
        dest = self.path(sha)
        if dest.exists():
            os.unlink(tmp)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        return sha

    def _tmp(self) -> tuple[int, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=".tmp-", dir=self.root)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.path(sha).exists():
            return sha
        fd, tmp = self._tmp()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return self._commit(tmp, sha)

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy `src` in, streaming, hashing while copying; returns (sha256, size)."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = self._tmp()
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        return self._commit(tmp, h.hexdigest()), size

    def put_tree(self, src: Path) -> tuple[str, int]:
        """Store every file below directory `src` and a JSON listing of them; returns the
        listing's sha256 and the number of files. The listing keeps the directory structure."""
        files = []
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            sha, size = self.put_file(path)
            files.append({"path": path.relative_to(src).as_posix(), "sha256": sha, "size": size})
        listing = json.dumps({"files": files}, sort_keys=True).encode()
        return self.put_bytes(listing), len(files)

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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
