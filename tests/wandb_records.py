"""Decode W&B ``.wandb`` transaction logs written by the SDK in offline mode.

Test helper: lets tests assert on exactly what the wandb SDK would upload on
``wandb sync`` without any network access.

Since wandb 0.18 the file is written by the Go ``wandb-core`` service
(``core/internal/transactionlog`` on top of ``core/pkg/leveldb``); wandb 0.31.0
ships no Python reader, so the format is implemented here:

* A 7-byte file header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16,
  little-endian) and a version byte (``0`` for wandb 0.31.0; newer wandb-core
  sources use ``1`` with the same framing).
* A LevelDB log (https://github.com/google/leveldb/blob/main/doc/log_format.md)
  cut into 32 KiB blocks counted from file offset 0, so the first block holds
  the file header and only ``32768 - 7`` bytes of chunks.
* Each chunk: ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | data``.
  The checksum is plain IEEE CRC-32 (``zlib.crc32``) over ``type + data``
  (wandb-core uses ``leveldb.CRCAlgoIEEE``, not LevelDB's masked CRC-32C).
  Types: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST. A chunk never crosses a block;
  if fewer than 7 bytes are left in a block they are zero padding.
* Each reassembled record is a serialized ``wandb_internal_pb2.Record``.

The final block is normally short. A process killed mid-write leaves a torn
tail (a partial chunk or a record missing its LAST chunk); ``read_records``
drops it by default, like wandb-core's reader, which treats it as EOF.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wandb.proto.wandb_internal_pb2 import ConfigItem, HistoryItem, Record, SummaryItem

__all__ = [
    "WandbLogError",
    "Record",
    "read_records",
    "iter_payloads",
    "history_rows",
    "config",
    "summary",
    "find_run_files",
]

FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_HEADER_LEN = 7
SUPPORTED_VERSIONS = frozenset({0, 1})

BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
CHUNK_FULL, CHUNK_FIRST, CHUNK_MIDDLE, CHUNK_LAST = 1, 2, 3, 4

_CHUNK_HEADER = struct.Struct("<IHB")  # checksum, length, type
_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version

_Item = HistoryItem | ConfigItem | SummaryItem


class WandbLogError(ValueError):
    """The file is not a readable W&B transaction log (bad header or corrupt chunk)."""


def _check_file_header(data: bytes, path: str) -> int:
    """Validate the 7-byte file header and return its version byte."""
    if len(data) < FILE_HEADER_LEN:
        raise WandbLogError(f"{path}: too short for a W&B header ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC:
        raise WandbLogError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    if version not in SUPPORTED_VERSIONS:
        raise WandbLogError(f"{path}: unsupported W&B log version {version}")
    return version


def iter_payloads(data: bytes, *, path: str = "<bytes>", strict: bool = False) -> Iterator[bytes]:
    """Yield the raw payload of every complete record in a ``.wandb`` byte string.

    Args:
        data: The whole file contents, starting with the 7-byte W&B header.
        path: Name used in error messages.
        strict: If true, a torn tail (incomplete final chunk or record) raises
            :class:`WandbLogError` instead of being silently dropped.

    Raises:
        WandbLogError: On a bad file header, a checksum mismatch, an impossible
            chunk length or type sequence, or (with ``strict``) a torn tail.
    """
    _check_file_header(data, path)
    pos = FILE_HEADER_LEN
    size = len(data)
    pending: list[bytes] | None = None  # chunks of a FIRST..LAST record in progress

    while True:
        block_left = BLOCK_LEN - pos % BLOCK_LEN
        if block_left < CHUNK_HEADER_LEN:
            pos += block_left  # zero padding at the end of a full block
            continue
        if pos + CHUNK_HEADER_LEN > size:
            break  # clean EOF, or a torn chunk header
        checksum, length, ctype = _CHUNK_HEADER.unpack_from(data, pos)
        if checksum == 0 and length == 0 and ctype == 0:
            if strict:
                raise WandbLogError(f"{path}: zeroed chunk header at offset {pos}")
            # wandb-core never writes a zero header (it pads < 7 bytes only), so
            # this is a zero-filled tail, e.g. after a crash; treat it as EOF.
            break
        start = pos + CHUNK_HEADER_LEN
        end = start + length
        if length > block_left - CHUNK_HEADER_LEN:
            raise WandbLogError(f"{path}: chunk at offset {pos} overflows its block")
        if end > size:
            break  # torn chunk payload
        if zlib.crc32(data[start - 1 : end]) != checksum:
            raise WandbLogError(f"{path}: checksum mismatch in chunk at offset {pos}")
        payload = data[start:end]
        chunk_at, pos = pos, end

        if ctype == CHUNK_FULL:
            if pending is not None:
                raise WandbLogError(f"{path}: unexpected FULL chunk at offset {chunk_at}")
            yield payload
        elif ctype == CHUNK_FIRST:
            if pending is not None:
                raise WandbLogError(f"{path}: unexpected FIRST chunk at offset {chunk_at}")
            pending = [payload]
        elif ctype in (CHUNK_MIDDLE, CHUNK_LAST):
            if pending is None:
                raise WandbLogError(f"{path}: chunk type {ctype} without FIRST at {chunk_at}")
            pending.append(payload)
            if ctype == CHUNK_LAST:
                yield b"".join(pending)
                pending = None
        else:
            raise WandbLogError(f"{path}: unknown chunk type {ctype} at offset {chunk_at}")

    if strict and pending is not None:
        raise WandbLogError(f"{path}: multi-chunk record missing its LAST chunk (file size {size})")
    if strict and pos < size:
        raise WandbLogError(f"{path}: truncated chunk at offset {pos} (file size {size})")


def read_records(path: str | Path, *, strict: bool = False) -> list[Record]:
    """Read and decode all records of a ``.wandb`` file, in file order.

    Args:
        path: Path of a ``run-<id>.wandb`` file.
        strict: Raise on a torn tail instead of dropping it (see :func:`iter_payloads`).

    Returns:
        The decoded ``wandb.proto.wandb_internal_pb2.Record`` messages. Each
        record's ``num`` is wandb-core's per-file sequence number.
    """
    data = Path(path).read_bytes()
    records = []
    for payload in iter_payloads(data, path=str(path), strict=strict):
        rec = Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _item_path(item: _Item) -> tuple[str, ...]:
    """Key path of a history/config/summary item.

    wandb-core flattens nested dicts (e.g. a ``wandb.Image``) into one item per
    leaf with ``nested_key = ["img", "width"]``; top-level items use either
    ``key`` or a one-element ``nested_key``.
    """
    return tuple(item.nested_key) if item.nested_key else (item.key,)


def _set_path(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``target[p0][p1]...[pn] = value``, creating (or replacing) intermediate dicts."""
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


def _pop_path(target: dict[str, Any], path: tuple[str, ...]) -> None:
    """Delete ``target[p0]...[pn]`` if present."""
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            return
        target = child
    target.pop(path[-1], None)


def _history_value(item: HistoryItem) -> Any:
    """Decode a ``HistoryItem`` written in either the JSON or the typed encoding."""
    try:
        kind = item.WhichOneof("value")
    except ValueError:  # wandb before the typed encoding (0.26): JSON only
        kind = None
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)  # boolean / integer / number / text


def history_rows(records: Iterable[Record]) -> list[dict[str, Any]]:
    """Return one dict per history record, in file order.

    Values are decoded from either history encoding (``value_json`` or the typed
    ``value`` oneof). Flattened nested keys are re-nested, so media come back as
    their dict form, e.g. ``row["img"] == {"_type": "image-file", "path": ...}``.
    Rows also carry the SDK-added ``_timestamp`` and ``_runtime``; ``_step`` is
    taken from ``HistoryRecord.step.num`` when set.
    """
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in rec.history.item:
            _set_path(row, _item_path(item), _history_value(item))
        if rec.history.HasField("step"):
            row["_step"] = rec.history.step.num
        rows.append(row)
    return rows


def _apply_updates(
    target: dict[str, Any], update: Iterable[_Item], remove: Iterable[_Item]
) -> None:
    """Apply config/summary ``update`` items (JSON values), then ``remove`` items."""
    for item in update:
        _set_path(target, _item_path(item), json.loads(item.value_json))
    for item in remove:
        _pop_path(target, _item_path(item))


def config(records: Iterable[Record]) -> dict[str, Any]:
    """Merge the run's config: the ``RunRecord`` config, then every config record.

    Values are the JSON-decoded plain values (``{"lr": 0.1}``, not the
    ``{"value": ..., "desc": ...}`` form of ``config.yaml``). The ``_wandb`` key
    holds SDK-internal metadata; drop it before comparing with user config.
    """
    merged: dict[str, Any] = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            _apply_updates(merged, rec.run.config.update, rec.run.config.remove)
        elif kind == "config":
            _apply_updates(merged, rec.config.update, rec.config.remove)
    return merged


def summary(records: Iterable[Record]) -> dict[str, Any]:
    """Merge the run summary: the ``RunRecord`` summary, then every summary record.

    wandb-core itself writes a summary record with the latest value of every
    logged key after each history step, so this is the run summary as a sync
    would upload it, plus internal keys (``_wandb``, ``_runtime``, ``_step``,
    ``_timestamp``). Nested keys are re-nested into dicts.
    """
    merged: dict[str, Any] = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            _apply_updates(merged, rec.run.summary.update, rec.run.summary.remove)
        elif kind == "summary":
            _apply_updates(merged, rec.summary.update, rec.summary.remove)
    return merged


def find_run_files(wandb_dir: str | Path, *, run_id: str | None = None) -> list[Path]:
    """Return every ``*.wandb`` file below ``wandb_dir``, sorted by path.

    Symlinked directories are not followed, so the ``latest-run`` symlink that
    wandb keeps in its directory does not produce duplicates. Offline run
    directories are named ``offline-run-<YYYYmmdd_HHMMSS>-<id>`` (with ``-1``,
    ``-2``... appended on a same-second collision) and hold ``run-<id>.wandb``,
    so for one parent directory path order is start order.

    Args:
        wandb_dir: Directory to search (e.g. the ``dir`` given to ``wandb.init``).
        run_id: If given, only return transaction logs of that run id.
    """
    found = []
    for root, _dirs, files in os.walk(wandb_dir):  # followlinks=False
        for name in files:
            if not name.endswith(".wandb"):
                continue
            if run_id is not None and name != f"run-{run_id}.wandb":
                continue
            path = Path(root, name)
            if path.is_file():
                found.append(path)
    return sorted(found)
