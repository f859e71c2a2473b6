"""Segment files of one rank: JSONL encoding/decoding, sealing to Parquet, the hash-chained index.

Shared by the writer (which appends and seals), the reader and the verifier, so that all three
read the bytes the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .blobs import file_sha256
from .fsio import fsync_dir, read_bytes, write_atomic
from .schema import ARROW_SCHEMA, INT64_MAX, INT64_MIN
from .validate import BLOB_REF, JournalCorruption, check_records

SEGMENT_RE = re.compile(r"^(\d{6,})\.(jsonl|parquet)$")
INDEX_NAME = "index.jsonl"

#: A row as the writer and the JSONL reader hold it, in `COLUMNS` order.
Row = tuple


#: JSON tokens (those Python's json reads) for the floats JSON itself cannot express.
SPECIAL_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def format_float(v: float) -> str:
    """Exact JSON text of a float (repr round-trips)."""
    r = repr(v)
    return SPECIAL_FLOATS[r] if r[-1] in "nf" else r


#: What encoding a record the schema cannot hold raises: ValueError for an integer outside
#: int64 or a string that is not valid Unicode (Arrow raises OverflowError or ArrowInvalid for
#: the first, UnicodeEncodeError for the second), TypeError for a value of the wrong type.
ENCODE_ERRORS = (ValueError, TypeError, OverflowError, pa.ArrowException)


def _check_int64(value: Any, what: str) -> None:
    if value is not None and (type(value) is not int or not INT64_MIN <= value <= INT64_MAX):
        raise ValueError(f"{what} {value!r} is not an int64")


def _check_float(value: Any, what: str) -> None:
    if value is not None and type(value) is not float:
        raise TypeError(f"{what} must be a float, got {type(value).__name__}")


def _check_text(text: Any, what: str) -> None:
    """Parquet and Arrow strings are UTF-8: a lone surrogate (as `os.fsdecode` makes from
    undecodable bytes) cannot be stored, although json.dumps would escape it."""
    if text is None:
        return
    if type(text) is not str:
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} is not valid Unicode ({e.reason} at position {e.start})"
                             ) from None


def encode_row(row: Row) -> str:
    """One JSONL line for a row; null fields are omitted to keep lines short. A field the record
    schema cannot hold raises one of ENCODE_ERRORS, so the writer can refuse that record alone
    rather than write a line that would make the whole segment unreadable. (`meta` needs no
    check: it is JSON text from json.dumps, all ASCII.)"""
    seq, t, kind, name, step, batch_idx, value, text, blob, meta = row
    _check_float(t, "time")
    _check_text(name, "name")
    _check_int64(step, "step")
    _check_int64(batch_idx, "batch_idx")
    _check_float(value, "value")
    _check_text(text, "text")
    parts = [f'{{"seq":{seq},"time":{format_float(t)},"kind":"{kind}","name":{json.dumps(name)}']
    if step is not None:
        parts.append(f',"step":{step}')
    if batch_idx is not None:
        parts.append(f',"batch_idx":{batch_idx}')
    if value is not None:
        parts.append(f',"value":{format_float(value)}')
    if text is not None:
        parts.append(f',"text":{json.dumps(text)}')
    if blob is not None:
        parts.append(f',"blob":"{blob}"')
    if meta is not None:
        parts.append(f',"meta":{json.dumps(meta)}')
    parts.append("}\n")
    return "".join(parts)


@dataclass
class JsonlRead:
    rows: list[Row]
    torn_tail: bool  # the last line was incomplete (a crash mid-append); it is ignored
    #: Bytes of the data taken in: up to the end of the last complete line read (or skipped as
    #: damaged), before a torn last line. A reader following the segment resumes there.
    end: int = 0


def read_jsonl(path: Path, strict: bool = True) -> JsonlRead:
    """Rows of an active segment. A torn last line is ignored; a bad line before it is
    corruption (raised when `strict`, skipped otherwise)."""
    return decode_jsonl(read_bytes(path), str(path), strict)


def decode_jsonl(data: bytes, where: str, strict: bool = True) -> JsonlRead:
    """Rows of the bytes of an active segment, or of a part of one that starts at a line (a
    reader following a live segment decodes what was appended since its last read). The one
    JSONL decoder of the reader, the verifier and the follower, so that they agree on what a
    line holds and on what a torn one is: a last line without its newline, or a final line
    that does not parse (e.g. a zero-filled page), is ignored; a bad line before it is
    corruption (raised when `strict`, skipped otherwise). `where` names the data in errors."""
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # no newline after the last line: torn mid-write
    complete = lines[:-1]
    rows: list[Row] = []
    get = dict.get
    end = 0
    for i, line in enumerate(complete):
        try:
            d = json.loads(line)
            rows.append(
                (d["seq"], d["time"], d["kind"], d["name"], get(d, "step"), get(d, "batch_idx"),
                 get(d, "value"), get(d, "text"), get(d, "blob"), get(d, "meta"))
            )
        except (ValueError, KeyError, TypeError) as e:
            if i == len(complete) - 1 and not torn:
                # A final line that does not parse is also a torn write (e.g. zero-filled page).
                torn = True
                break
            if strict:
                raise JournalCorruption(f"{where}: line {i + 1} is not a valid record ({e})"
                                        ) from e
        end += len(line) + 1
    return JsonlRead(rows, torn, end)


def rows_to_table(rows: list[Row]) -> pa.Table:
    if not rows:
        return ARROW_SCHEMA.empty_table()
    cols = list(zip(*rows))
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(cols, ARROW_SCHEMA)], schema=ARROW_SCHEMA
    )


def encode_metrics(first_seq: int, batch: list[tuple], names: dict[str, str]
                   ) -> tuple[pa.Table, pa.Buffer]:
    """A batch of the writer's plain metric records (time, name, step, batch_idx, value, route)
    as a table and as its JSONL lines, both built column-wise by Arrow.

    Why: formatting a float with Python's repr costs about 0.5 µs, so a per-record encoder spent
    2-3 µs on each record in the flusher thread, which shares the GIL with training. Arrow's
    float-to-string cast is a shortest round-trip representation (exact, like repr) at about
    0.1 µs, and the table is kept for sealing without transposing tuples again. The lines parse
    to the same records as `encode_row`'s; integral values may print without a fraction ("2"),
    which every JSON reader reads as the same number. `names` caches JSON-encoded names."""
    import pyarrow.compute as pc

    n = len(batch)
    seq = pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n), start=first_seq - 1)
    t, name, step, batch_idx, value = (
        pa.array(map(itemgetter(k), batch), typ)
        for k, typ in enumerate((pa.float64(), pa.string(), pa.int64(), pa.int64(), pa.float64()))
    )
    codes = name.dictionary_encode()
    encoded = []
    for nm in codes.dictionary.to_pylist():
        enc = names.get(nm)
        if enc is None:
            enc = names[nm] = json.dumps(nm)
        encoded.append(enc)
    lines = pc.binary_join_element_wise(
        '{"seq":', pc.cast(seq, pa.string()), ',"time":', pc.cast(t, pa.string()),
        ',"kind":"metric","name":', pa.array(encoded, pa.string()).take(codes.indices),
        _optional_field(',"step":', step), _optional_field(',"batch_idx":', batch_idx),
        ',"value":', _float_text(value), "}\n", "",
    )
    nulls = pa.nulls(n, pa.string())
    table = pa.Table.from_arrays(
        [seq, t, pa.repeat(pa.scalar("metric"), n), name, step, batch_idx, value,
         nulls, nulls, nulls], schema=ARROW_SCHEMA)
    return table, _string_data(lines)


def _optional_field(prefix: str, ints: pa.Array) -> pa.Array | str:
    """`prefix` + the number, or nothing where the value is null (null fields are omitted)."""
    import pyarrow.compute as pc

    if ints.null_count == len(ints):
        return ""
    field = pc.binary_join_element_wise(prefix, pc.cast(ints, pa.string()), "")
    return pc.fill_null(field, "") if ints.null_count else field


def _float_text(values: pa.Array) -> pa.Array:
    """JSON text of float64 values: Arrow's shortest round-trip text, with the spellings JSON
    lacks mapped as Python's json reads them (NaN, Infinity) and -0 kept negative."""
    import pyarrow.compute as pc

    text = pc.cast(values, pa.string())
    if pc.any(pc.equal(values, 0.0)).as_py():
        text = pc.if_else(pc.equal(text, "-0"), "-0.0", text)
    if not pc.all(pc.is_finite(values)).as_py():
        text = pc.replace_substring(pc.replace_substring(text, "nan", "NaN"), "inf", "Infinity")
    return text


def _string_data(strings: pa.Array) -> pa.Buffer:
    """The concatenated bytes of a string array without nulls (its data buffer, zero-copy)."""
    _, offsets, data = strings.buffers()
    bounds = memoryview(offsets).cast("i")
    start, end = bounds[strings.offset], bounds[strings.offset + len(strings)]
    return data.slice(start, end - start)


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise JournalCorruption(f"{path}: unreadable Parquet segment ({e})") from e


def segment_files(seg_dir: Path) -> dict[int, dict[str, Path]]:
    """{segment number: {'jsonl'|'parquet': path}} for the files present now."""
    found: dict[int, dict[str, Path]] = {}
    try:
        names = os.listdir(seg_dir)
    except FileNotFoundError:
        return found
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = seg_dir / name
    return dict(sorted(found.items()))


def segment_name(number: int, ext: str) -> str:
    return f"{number:06d}.{ext}"


def read_sealed(path: Path, sha256: str | None) -> pa.Table:
    """A sealed segment, checked against the sha256 its index entry recorded (when it has one
    yet): a modified segment is corruption, never data to export."""
    data = read_bytes(path)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise JournalCorruption(f"{path}: sha256 differs from the index: the sealed segment was "
                                "modified")
    try:
        return pq.read_table(io.BytesIO(data))
    except (OSError, pa.ArrowException) as e:
        raise JournalCorruption(f"{path}: unreadable Parquet segment ({e})") from e


def read_segment(seg_dir: Path, number: int, sha256: str | None = None
                 ) -> tuple[pa.Table, bool]:
    """The records of segment `number`, preferring the sealed file. Tolerates the segment being
    sealed while we look (the JSONL vanishes, the Parquet appears). Returns (table, torn_tail)."""
    parquet = seg_dir / segment_name(number, "parquet")
    jsonl = seg_dir / segment_name(number, "jsonl")
    for _ in range(3):
        if parquet.exists():
            try:
                return read_sealed(parquet, sha256), False
            except FileNotFoundError:
                pass
        try:
            got = read_jsonl(jsonl)
            return rows_to_table(got.rows), got.torn_tail
        except FileNotFoundError:
            continue
    raise JournalCorruption(f"{seg_dir}: segment {number} vanished while being read")


def iter_tables(seg_dir: Path, after_seq: int = 0, index: list[dict] | None = None
                ) -> Iterator[pa.Table]:
    """Record tables of a rank in seq order, one segment at a time, skipping segments whose
    records are all at or below `after_seq` (known from the index without opening them).
    Sealed segments are checked against their index entry's sha256."""
    entries = {e["segment"]: e for e in (index or [])}
    for number in segment_files(seg_dir):
        entry = entries.get(number)
        if entry is not None and (entry["last_seq"] or 0) <= after_seq:
            continue
        table, _ = read_segment(seg_dir, number, entry["sha256"] if entry else None)
        if after_seq > 0 and table.num_rows:
            import pyarrow.compute as pc

            table = table.filter(pc.greater(table["seq"], after_seq))
        if table.num_rows:
            check_records(table, f"{seg_dir}/{segment_name(number, '*')}")
            yield table


# --- sealing and the index ----------------------------------------------------------------


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def read_index(rank_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Index entries and a list of problems found while reading them (chain breaks, bad lines)."""
    entries, _, problems = read_index_lines(rank_dir)
    return entries, problems


def read_index_lines(rank_dir: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Valid index entries, the hash of every complete line (what `index_head` and the
    manifest's anchors count), and the problems found: chain breaks, lines that are not valid
    entries (left out of the entries), a torn last line."""
    path = rank_dir / INDEX_NAME
    entries: list[dict[str, Any]] = []
    hashes: list[str] = []
    problems: list[str] = []
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        return entries, hashes, problems
    except OSError as e:
        problems.append(f"{path}: unreadable ({e.strerror})")
        return entries, hashes, problems
    prev = ""
    lines = data.split(b"\n")
    if lines[-1] != b"":
        problems.append(f"{path}: torn last line (ignored)")
    for i, line in enumerate(lines[:-1]):
        hashes.append(line_hash(line))
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if not _valid_entry(entry):
            problems.append(f"{path}: line {i + 1} is not a valid index entry")
            prev = hashes[-1]
            continue
        if entry.get("prev") != prev:
            problems.append(f"{path}: hash chain broken at line {i + 1} (segment "
                            f"{entry.get('segment')}): 'prev' does not match the line before")
        prev = hashes[-1]
        entries.append(entry)
    return entries, hashes, problems


def _valid_entry(e: Any) -> bool:
    return (isinstance(e, dict) and type(e.get("segment")) is int and e["segment"] >= 0
            and all(v is None or type(v) is int for v in (e.get("first_seq"), e.get("last_seq")))
            and type(e.get("count")) is int and isinstance(e.get("sha256"), str)
            and BLOB_REF.fullmatch(e["sha256"]) is not None)


#: Fields of an index entry that vouch for files outside the chain (see `manifest.anchors`).
ANCHOR_KEYS = ("run_sha256", "destinations_sha256")


def last_anchors(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The anchors of the last index entry that has them (older entries have none)."""
    for e in reversed(entries):
        if ANCHOR_KEYS[1] in e:
            return {k: e.get(k) for k in ANCHOR_KEYS}
    return None


def index_head(rank_dir: Path) -> dict[str, Any]:
    """The index as it stands: its number of complete lines and the hash of the last one. A
    session records it at its start and end in the manifest, so that the index and the manifest
    vouch for each other (see `verify`)."""
    _, hashes, _ = read_index_lines(rank_dir)
    return {"lines": len(hashes), "head": hashes[-1] if hashes else ""}


def append_index(rank_dir: Path, entry: dict[str, Any]) -> None:
    """Append one entry chained to the previous line; fsynced (sealing is rare, this is cheap)."""
    path = rank_dir / INDEX_NAME
    prev = ""
    try:
        lines = read_bytes(path).split(b"\n")  # a regular file: never waits on a FIFO
        complete = [ln for ln in lines[:-1] if ln]
        if complete:
            prev = line_hash(complete[-1])
        if lines[-1]:
            # A torn last line from a crash: cut it so the new entry starts on its own line.
            with open(path, "r+b") as f:
                f.truncate(sum(len(ln) + 1 for ln in lines[:-1]))
    except FileNotFoundError:
        pass
    entry = {**entry, "prev": prev}
    line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    with open(path, "ab") as f:
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def seal(rank_dir: Path, number: int, table: pa.Table,
         anchors: dict[str, str] | None = None) -> dict[str, Any]:
    """Write `table` as segment `number`'s Parquet file atomically, index it, drop its JSONL.
    `anchors` (digests of the run.json and the declared destinations at sealing time) go into
    the index entry, where the hash chain covers them."""
    seg_dir = rank_dir / "segments"
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=max(table.num_rows, 1))
    data = buf.getvalue()
    final = seg_dir / segment_name(number, "parquet")
    entry = {**index_entry(number, table, hashlib.sha256(data).hexdigest()), **(anchors or {})}
    try:
        write_atomic(final, data)
        fsync_dir(seg_dir)
        append_index(rank_dir, entry)
    except OSError:
        # Undo, so that the JSONL segment stays the one copy of these records (a Parquet file
        # beside it would hide records appended to the JSONL later).
        try:
            os.unlink(final)
        except FileNotFoundError:
            pass
        raise
    try:
        os.unlink(seg_dir / segment_name(number, "jsonl"))
    except FileNotFoundError:
        pass
    return entry


def index_entry(number: int, table: pa.Table, sha: str) -> dict[str, Any]:
    seqs = table["seq"]
    n = table.num_rows
    return {
        "segment": number,
        "file": segment_name(number, "parquet"),
        "first_seq": seqs[0].as_py() if n else None,
        "last_seq": seqs[n - 1].as_py() if n else None,
        "count": n,
        "sha256": sha,
    }


def recover(rank_dir: Path) -> tuple[int, int]:
    """Bring a rank left by an earlier session (maybe killed) to a clean state: index any sealed
    segment the index misses, remove JSONL already sealed, seal a leftover active segment.
    Returns (last seq, last segment number). Must only run while holding the rank's lock."""
    seg_dir = rank_dir / "segments"
    _set_aside_if_not_a_file(rank_dir / INDEX_NAME)
    entries, _ = read_index(rank_dir)
    indexed = {e["segment"] for e in entries}
    last_seq = max((e["last_seq"] or 0 for e in entries), default=0)
    last_number = max(indexed, default=0)
    for tmp in seg_dir.glob(".*.tmp") if seg_dir.exists() else ():
        tmp.unlink()
    for number, files in segment_files(seg_dir).items():
        if "parquet" in files:
            if number not in indexed:
                table = read_parquet(files["parquet"])
                append_index(rank_dir, index_entry(number, table, file_sha256(files["parquet"])))
                if table.num_rows:
                    last_seq = max(last_seq, table["seq"][table.num_rows - 1].as_py())
            if "jsonl" in files:
                files["jsonl"].unlink()
        else:
            got = read_jsonl(files["jsonl"], strict=False)
            table = rows_to_table(got.rows)
            seal(rank_dir, number, table)
            if table.num_rows:
                last_seq = max(last_seq, table["seq"][table.num_rows - 1].as_py())
        last_number = max(last_number, number)
    return last_seq, last_number


def _set_aside_if_not_a_file(path: Path) -> None:
    """An index that is not a regular file (a FIFO would make every read and append wait for
    ever, a directory cannot be appended to) is renamed aside, `<name>.damaged-<time>-<pid>`,
    with a warning; `recover` then indexes the sealed segments again (as for a damaged
    manifest, `verify` reports the index lines the manifest saw as removed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-"
                           f"{os.getpid()}")
    os.replace(path, aside)
    warnings.warn(f"itwinai-journal: {path} is not a regular file; it is kept as {aside.name} "
                  "and the index is rebuilt from the sealed segments", RuntimeWarning,
                  stacklevel=2)


def seq_problems(seqs: pa.ChunkedArray | pa.Array, start_after: int, where: str
                 ) -> tuple[list[str], int]:
    """Gaps or regressions in a seq column (seq is contiguous per rank by construction);
    returns (problems, last seq seen). Vectorised: the common, clean case costs one pass."""
    n = len(seqs)
    if n == 0:
        return [], start_after
    import pyarrow.compute as pc

    first, last = seqs[0].as_py(), seqs[n - 1].as_py()
    if first == start_after + 1 and last - first + 1 == n and (
        n == 1 or pc.all(pc.equal(pc.pairwise_diff(_contiguous(seqs)), 1)).as_py()
    ):
        return [], last
    problems: list[str] = []
    prev = start_after
    for s in seqs.to_pylist():
        if s <= prev:
            problems.append(f"{where}: seq regression {prev} -> {s}")
        elif s != prev + 1:
            problems.append(f"{where}: seq gap {prev} -> {s}")
        prev = s
        if len(problems) > 5:
            problems.append(f"{where}: more seq problems not listed")
            break
    return problems, last


def _contiguous(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
