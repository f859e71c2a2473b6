"""The Prov4ML target's directory for one rank: where the documents, the cursor and the
records they cover are, and how a new build replaces the old one in one rename.

    <run dir>/rank-<rank:05d>/<experiment>_0/
        ...                          yprov4ml's documents, metric files, artifacts
        .itwinai-sync-cursor         the journal seq the documents cover (JSON)
        .itwinai-sync-records.arrow  the records they were built from (Arrow IPC, zstd)

The records file is what makes a commit incremental: the next build starts from it and the
new batches the engine hands over, never from the journal. A rank directory without it (made
by an earlier version) reports cursor 0, so its documents are built once more from every
record, byte-identical."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from itwinai_journal.format.fsio import fsync_dir, write_atomic
from itwinai_sync.api import ExportError

MARKER = ".itwinai-sync-cursor"
HELD = ".itwinai-sync-records.arrow"
TMP_PREFIX = ".tmp-rank-"
OLD_PREFIX = ".old-rank-"


def rank_dir_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def committed_documents(path: Path) -> Path | None:
    """Where the rank's committed documents are: `path`, or, after an export killed between
    its two renames (see `swap`), the copy it renamed aside, which the next export puts back.
    Read from there, the cursor never goes back while the documents are aside."""
    if path.is_dir():
        return path
    tag = path.name.removeprefix("rank-") + "-"
    try:
        aside = sorted(p for p in path.parent.iterdir()
                       if p.name.startswith(OLD_PREFIX + tag) and p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return aside[0] if aside else None


def committed_folder(path: Path) -> Path | None:
    """The yprov4ml run folder holding the cursor marker, in the committed documents."""
    documents = committed_documents(path)
    if documents is None:
        return None
    try:
        folders = sorted(p for p in documents.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((f for f in folders if (f / MARKER).is_file()), None)


def committed_cursor(folder: Path | None) -> int:
    """The cursor of a run folder's documents; 0 when there are none, or when the records they
    were built from are not beside them (the next build starts from the first record)."""
    if folder is None or not (folder / HELD).is_file():
        return 0
    try:
        return int(json.loads((folder / MARKER).read_text())["cursor"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def write_commit(folder: Path, marker: dict, held: pa.Table) -> None:
    """The cursor marker and the records the documents cover, into a build's run folder."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, held.schema,
                         options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(held.combine_chunks())
    write_atomic(folder / HELD, sink.getvalue().to_pybytes())
    write_atomic(folder / MARKER, (json.dumps(marker, sort_keys=True) + "\n").encode())


def read_held(folder: Path) -> pa.Table:
    """The records a committed run folder's documents were built from. A file that cannot be
    read is an ExportError for this rank that says how to rebuild it, not a pyarrow trace."""
    try:
        with pa.memory_map(str(folder / HELD)) as source:
            return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as e:
        raise ExportError(f"prov4ml: {folder / HELD} cannot be read ({e}); delete it, and "
                          "the next sync rebuilds this rank's documents from the journal"
                          ) from None


def recover(path: Path) -> None:
    """After a crash: drop half-built directories; put back documents that were renamed aside
    but not replaced."""
    parent = path.parent
    if not parent.is_dir():
        return
    tag = path.name.removeprefix("rank-") + "-"
    for entry in sorted(parent.iterdir()):
        if entry.name.startswith(TMP_PREFIX + tag):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(OLD_PREFIX + tag):
            if path.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.rename(entry, path)
    fsync_dir(parent)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def swap(new: Path, final: Path, aside: Path) -> None:
    """Replace the directory `final` by `new`: the old documents are renamed aside, the new
    ones in, and the old ones deleted. A crash in between leaves the aside copy, which the
    next open puts back. (Directory renames: the whole rank directory, documents and cursor,
    changes at once, which no single-file atomic write can do.)"""
    if final.exists():
        os.rename(final, aside)
    os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
