"""TensorBoard target: each rank of a journal run becomes one TensorBoard run (a directory).

Layout: `<logdir>/<experiment-dir>/<run_id>/rank-<rank:05d>/`, `logdir` being `--logdir` or
`<savedir>/tensorboard`, the experiment directory the journal's own (percent-encoded) name. The
run directory belongs to one journal (its identity is in `.itwinai-journal.json`, claimed
atomically); another journal with the same experiment and run id goes to
`<run_id>.journal-<id>`. It is created by the first batch that holds a record for TensorBoard.
Syncs exclude each other per journal with a lock in `<logdir>/.itwinai-sync-locks/`, whichever
copy of the savedir they read.

Exactly once: every `export` writes one event file holding the records with seq in
(previous cursor, cursor], named `events.out.tfevents.<first:012d>-<last:012d>.itwinai`. It is
written under a temporary name without "tfevents" (so a live TensorBoard never reads a half
file), fsynced, then renamed into place: a file is either complete or absent. The cursor is read
back from the names, so a killed sync resumes exactly after the last complete file (leftover
temporary files are deleted when the rank is opened for writing). TensorBoard selects files with
"tfevents" in the name and reads them in name order, which the zero-padded first seq makes seq
order (12 digits: up to 10^12 records per rank). Once a rank has a directory, a batch in which
nothing is for TensorBoard still gets a file, holding only the `file_version` event, so that the
cursor advances (a journal with nothing for TensorBoard gets no directory at all). Every
file starts with that event, as TensorBoard's own writer does; `brain.Event:2` also stops
TensorBoard from discarding points whose step goes backwards (it then purges only on a
SessionLog.START, which we never write).

Kinds: metrics are scalars (`simple_value`, so float32 like `add_scalar`) with the record's
step and its `time` as the event's wall time; images and matplotlib figures are image summaries
of the journal's PNG bytes (size and colour type from the PNG header); plotly figures cannot be
shown and are skipped with a note; text (inline or, when large, a blob) is a text-plugin string
tensor of shape [1] under the tag `<name>/text_summary`, as `SummaryWriter.add_text` writes it;
`histogram` records (the W&B-style `watch` capture) are HistogramProtos with the bin
right edges as `bucket_limit` (an all-NaN tensor's histogram, without bins, is written empty).
Sampled system metrics (`system_metric`) are scalars `system/<field>` in the journal's units,
at step = the sample's ordinal in the rank and wall time = when it was read (see
system_metrics.py), so TensorBoard groups them in a "system" section of the rank's run.

Records logged without a step: a watch histogram is written at step = the forward call it was
taken at (its meta `call`, the model's iteration count); any other record at step = its
journal seq. Both are deterministic, increasing in logging order and the same on every
re-sync, whereas step 0 (what add_scalar writes for global_step=None) would pile all such points
onto one x position.

Hyperparameters: TensorBoard's HParams dashboard keeps only the first `session_start_info` it
reads per run, so params are not appended per batch. They live in one file that sorts before all
others, `events.out.tfevents.000000000000-hparams.itwinai`, holding every param of the rank
exported so far (last value per name). A batch with params merges them into it and replaces it
atomically *before* its own events file is renamed into place, so a crash in between only
means the same values are merged again. A TensorBoard that is already running needs a reload
to see params that arrive after it read that file. Values are what itwinai's
TensorBoardLogger gives `add_hparams`: numbers and bools as numbers, strings as strings, None
left out, anything else (lists, dicts) as Python's `str()` of it. Unlike `add_hparams`, which
writes them into a run of their own (a sub-directory named after the time) with a fixed
"success" status, they belong to the rank's run here, next to its scalars; no experiment
summary is written, so TensorBoard infers the columns from every rank's params.

Speed: one reused Event per metric name, serialized per record; the TFRecord framing (length,
masked CRC-32C of the length, data, masked CRC-32C of the data) is done for a whole batch, the
CRCs by the `crc32c` package (TensorBoard's own CRC is pure Python).
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.format.fsio import fsync_dir, write_atomic
from itwinai_sync import compat
from itwinai_sync.api import (
    DirectoryExporter,
    ExportError,
    Notes,
    RankSink,
    TargetOption,
    int64_step,
    meta_of,
    param_str,
)

from . import system_metrics

EVENTS_RE = re.compile(r"^events\.out\.tfevents\.(\d{12})-(\d{12})\.itwinai$")
HPARAMS_FILE = "events.out.tfevents.000000000000-hparams.itwinai"
TMP_PREFIX = ".tmp-"
FILE_VERSION = "brain.Event:2"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: What SummaryWriter.add_text appends to a text's tag.
TEXT_SUFFIX = "/text_summary"
#: PNG colour type -> Summary.Image colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
PNG_COLORSPACE = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_COLUMNS = ("seq", "time", "kind", "name", "step", "value", "text", "blob", "meta")


def events_name(first: int, last: int) -> str:
    return f"events.out.tfevents.{first:012d}-{last:012d}.itwinai"


@functools.cache
def _tb() -> SimpleNamespace:
    """TensorBoard's protos and helpers, imported on first use: `--help` must not need them."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.text import metadata as text_metadata

    return SimpleNamespace(
        Event=event_pb2.Event, Summary=summary_pb2.Summary,
        HistogramProto=summary_pb2.HistogramProto, TensorProto=tensor_pb2.TensorProto,
        TensorShapeProto=tensor_shape_pb2.TensorShapeProto,
        hparams=hparams_metadata, HParamsPluginData=plugin_data_pb2.HParamsPluginData,
        text_metadata=text_metadata.create_summary_metadata("", ""),
        text_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
    )


# -- TFRecord framing ------------------------------------------------------------------------


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`, as TensorBoard's reader checks it. The CRC comes
    from the `crc32c` package (hardware instructions where the CPU has them), bit-identical
    to TensorBoard's own pure-Python table and several times faster than vectorizing that
    table with numpy."""
    from crc32c import crc32c

    return _mask(crc32c(data))


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_HEADERS: dict[int, bytes] = {}


def _header(length: int) -> bytes:
    header = _HEADERS.get(length)
    if header is None:
        packed = struct.pack("<Q", length)
        header = _HEADERS[length] = packed + struct.pack("<I", masked_crc32c(packed))
    return header


def frame(records: list[bytes]) -> bytes:
    """TFRecord framing of serialized events: length, masked CRC of the length, data, masked
    CRC of the data. Headers depend on the length only and are cached; crc32c is imported
    once per frame, not per record (an import statement costs more than the CRC)."""
    from crc32c import crc32c

    footer = struct.Struct("<I").pack
    parts: list[bytes | None] = [None] * (3 * len(records))
    parts[0::3] = [_HEADERS.get(len(r)) or _header(len(r)) for r in records]
    parts[1::3] = records
    parts[2::3] = [footer(_mask(crc32c(r))) for r in records]
    return b"".join(parts)  # type: ignore[arg-type]


def hparam_value(text: str | None, meta: str | None = None) -> float | str | None:
    """A param's journal JSON as itwinai's TensorBoardLogger hands it to `add_hparams`: it
    keeps None, bool, int, float and str and turns anything else into its `str()` (see
    `param_str`), and `add_hparams` stores bools and numbers as numbers and leaves None out."""
    value = json.loads(text) if text is not None else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return float(value)
    return param_str(value, meta)


# -- the exporter ------------------------------------------------------------------------------


class TensorBoardExporter(DirectoryExporter):
    name = "tensorboard"
    kinds = frozenset({"metric", "image", "figure", "text", "param", "histogram",
                       system_metrics.KIND})
    batch_records = 50_000

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        super().__init__(savedir, options, notes)
        if why := compat.untested("tensorboard"):
            notes.add(f"tensorboard: {why}")
        logdir = options.get("logdir") or savedir / "tensorboard"
        self.root = Path(logdir).expanduser().resolve()

    cli_options = (
        TargetOption("--logdir", type="dir",
                     help="TensorBoard log directory (default: SAVEDIR/tensorboard)."),
    )

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        found = self.journal_dir(run)
        path = found / f"rank-{rank.rank:05d}" if found is not None else None
        if not create and (path is None or not path.is_dir()):
            return None
        return TensorBoardSink(self, run, rank, path)


class TensorBoardSink(RankSink):
    def __init__(self, exporter: TensorBoardExporter, run: RunInfo, rank: RankInfo,
                 path: Path | None):
        super().__init__(run, rank, exporter.notes)
        self.exporter = exporter
        self.path = path
        if path is not None and path.is_dir():
            # The engine holds the journal's lock: temporary files are no one's any more.
            for name in os.listdir(path):
                if name.startswith(TMP_PREFIX):
                    os.unlink(path / name)
        self._cursor = self.cursor()
        self._scalars: dict[str, tuple[Any, Any]] = {}

    def cursor(self) -> int:
        try:
            names = os.listdir(self.path) if self.path is not None else []
        except FileNotFoundError:
            return 0
        return max((int(m.group(2)) for m in map(EVENTS_RE.match, names) if m), default=0)

    def _claim(self) -> Path:
        """The rank's directory, the run's claimed for this journal on the first write."""
        if self.path is None:
            self.path = self.exporter.claim_run_dir(self.run) / f"rank-{self.rank.rank:05d}"
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def export(self, batch: pa.Table, cursor: int) -> None:
        first = self._cursor + 1
        if batch.num_rows:
            seqs = pc.min_max(batch["seq"])
            low, high = seqs["min"].as_py(), seqs["max"].as_py()
            if low < first or high > cursor:
                raise ExportError(f"{self.path}: records {low}..{high} are not within the "
                                  f"range ({self._cursor}, {cursor}] being exported")
        if cursor <= self._cursor:
            if batch.num_rows or cursor < self._cursor:
                raise ExportError(f"{self.path}: cursor {cursor} does not advance past "
                                  f"{self._cursor}")
            return
        self._claim()
        events, params = self._encode(batch)
        start = batch["time"][0].as_py() if batch.num_rows else self._session_start()
        body = frame([self._file_version(start), *events])
        if params:
            self._merge_hparams(params)
        self._write(events_name(first, cursor), body)
        self._cursor = cursor

    # -- encoding -----------------------------------------------------------------------------

    def _encode(self, batch: pa.Table) -> tuple[list[bytes], dict[str, tuple[float, str, str]]]:
        """Serialized events in seq order, and the batch's params (name -> (time, JSON,
        meta))."""
        out: list[bytes] = []
        params: dict[str, tuple[float, str, str]] = {}
        scalars = self._scalars
        columns = [batch[c].to_pylist() for c in _COLUMNS]
        for seq, t, kind, name, step, value, text, blob, meta in zip(*columns):
            if kind == "param":
                params[name] = (t, text, meta)
                continue
            if meta is not None:
                step = self._journal_form(kind, step, meta)
            if step is None:
                step = self._implicit_step(kind, seq, meta)
            if kind == system_metrics.KIND:
                out.extend(self._system_scalars(t, step, text))
            elif kind == "metric":
                proto = scalars.get(name)
                if proto is None:
                    proto = scalars[name] = self._scalar_proto(name)
                event, slot = proto
                event.wall_time = t
                event.step = step
                slot.simple_value = value
                out.append(event.SerializeToString())
            else:
                value_pb = self._summary_value(kind, name, text, blob, meta)
                if value_pb is not None:
                    event = _tb().Event(wall_time=t, step=step)
                    event.summary.value.append(value_pb)
                    out.append(event.SerializeToString())
        return out, params

    def _journal_form(self, kind: str, step: int | None, meta: str) -> int | None:
        """Say how a record the journal keeps in one of its storable forms is shown, and
        return its step: a step the int64 column could not hold (meta['step']) as
        SummaryWriter takes it (`int64_step`)."""
        d = meta_of(meta)
        if step is None and "step" in d:
            step = int64_step(d["step"])
            if step is not None:
                self.notes.add("tensorboard: records whose step is not a whole number within "
                               "int64 are written at int() of it, as SummaryWriter does (1.5 -> "
                               "1), clamped to int64 (2**70 -> 2**63-1, which SummaryWriter "
                               "refuses)")
        if "imag" in d:
            self.notes.add("tensorboard: complex metrics are written by their real part "
                           "(add_scalar takes real numbers); the journal keeps the imaginary "
                           "part in meta['imag']")
        if kind == "text" and d.get("logged_as"):
            self.notes.add("tensorboard: objects logged as a kind that cannot hold them (a "
                           "metric that is not a number, ...), which itwinai's TensorBoard "
                           "logger fails on, are written as text: their JSON, under "
                           "<name>/text_summary")
        if d.get("surrogates"):
            self.notes.add("tensorboard: lone surrogates in texts and params (which add_text "
                           "refuses) are written as U+FFFD; the journal keeps the code points "
                           "in meta['surrogates']")
        return step

    def _implicit_step(self, kind: str, seq: int, meta: str | None) -> int:
        """The step of a record logged without one (see the module docstring)."""
        call = json.loads(meta).get("call") if kind == "histogram" and meta else None
        if isinstance(call, int):
            self.notes.add("tensorboard: watch histograms are written at step = the forward "
                           "call they were taken at")
            return call
        self.notes.add("tensorboard: records logged without a step are written at step = "
                       "their journal seq")
        return seq

    def _system_scalars(self, t: float, step: int, text: str | None) -> list[bytes]:
        """A system-metrics sample: one scalar per field under `system/`, at the sample's
        ordinal as step and its time as wall time."""
        out = []
        for tag, value in system_metrics.tensorboard_scalars(system_metrics.sample(text)).items():
            proto = self._scalars.get(tag)
            if proto is None:
                proto = self._scalars[tag] = self._scalar_proto(tag)
            event, slot = proto
            event.wall_time, event.step, slot.simple_value = t, step, value
            out.append(event.SerializeToString())
        return out

    @staticmethod
    def _scalar_proto(name: str) -> tuple[Any, Any]:
        event = _tb().Event()
        return event, event.summary.value.add(tag=name)

    def _summary_value(self, kind: str, name: str, text: str | None, blob: str | None,
                       meta: str | None) -> Any:
        tb = _tb()
        if kind == "text":
            data = text.encode() if text is not None else self._blob(blob, name)
            return tb.Summary.Value(tag=name + TEXT_SUFFIX, metadata=tb.text_metadata,
                                    tensor=tb.TensorProto(dtype="DT_STRING", string_val=[data],
                                                          tensor_shape=tb.text_shape))
        if kind == "histogram":
            return self._histogram(name, text)
        png = self._blob(blob, name)
        if not png.startswith(PNG_SIGNATURE):
            kind_of = (json.loads(meta) if meta else {}).get("figure") or "non-PNG"
            self.notes.add(f"tensorboard: {kind} {name!r} is a {kind_of} {kind}, which "
                           "TensorBoard cannot show; skipped")
            return None
        width, height = struct.unpack(">II", png[16:24])
        image = tb.Summary.Image(height=height, width=width,
                                 colorspace=PNG_COLORSPACE.get(png[25], 3),
                                 encoded_image_string=png)
        return tb.Summary.Value(tag=name, image=image)

    def _histogram(self, name: str, text: str | None) -> Any:
        """A HistogramProto from the watch capture's JSON. A histogram without finite values
        (bins and counts null) is written empty, which TensorBoard shows as such."""
        try:
            h = json.loads(text or "")
            bins, counts = h.get("bins") or [], h.get("counts") or []
            if len(bins) != len(counts) + (1 if counts else 0):
                raise ValueError(f"{len(bins)} bin edges for {len(counts)} counts")
            histo = _tb().HistogramProto(
                min=h.get("min") or 0.0, max=h.get("max") or 0.0, num=h.get("num") or 0,
                sum=h.get("sum") or 0.0, sum_squares=h.get("sum_squares") or 0.0,
                bucket_limit=bins[1:], bucket=counts)
        except (ValueError, TypeError, AttributeError) as e:
            self.notes.add(f"tensorboard: histogram {name!r} is malformed ({e}); skipped")
            return None
        return _tb().Summary.Value(tag=name, histo=histo)

    def _blob(self, sha: str | None, name: str) -> bytes:
        try:
            return self.blobs.read(sha or "")
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ExportError(f"{self.rank.path}: record {name!r} refers to blob {sha!r}, "
                              "which is missing from the journal") from e

    def _file_version(self, wall_time: float) -> bytes:
        return _tb().Event(wall_time=wall_time, file_version=FILE_VERSION).SerializeToString()

    def _session_start(self) -> float:
        return self.rank.started or time.time()

    # -- hyperparameters ----------------------------------------------------------------------

    def _merge_hparams(self, params: dict[str, tuple[float, str, str]]) -> None:
        """Merge `params` into the rank's hparams file (see the module docstring)."""
        tb = _tb()
        data = self._read_hparams()
        info = data.session_start_info
        if not info.start_time_secs:
            info.start_time_secs = min(self._session_start(), *(t for t, _, _ in params.values()))
        for name, (_, text, meta) in params.items():
            if meta is not None:
                self._journal_form("param", None, meta)
            value = hparam_value(text, meta)
            if value is None:
                info.hparams.pop(name, None)
            elif isinstance(value, str):
                info.hparams[name].string_value = value
            else:
                info.hparams[name].number_value = value
        event = tb.Event(wall_time=info.start_time_secs, step=0)
        event.summary.value.add(tag=tb.hparams.SESSION_START_INFO_TAG,
                                metadata=tb.hparams.create_summary_metadata(data),
                                tensor=tb.hparams.NULL_TENSOR)
        self._write(HPARAMS_FILE, frame([self._file_version(info.start_time_secs),
                                         event.SerializeToString()]))

    def _read_hparams(self) -> Any:
        tb = _tb()
        data = tb.HParamsPluginData()
        path = self.path / HPARAMS_FILE
        if not path.exists():
            return data
        from tensorboard.backend.event_processing.event_file_loader import (
            LegacyEventFileLoader,
        )

        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tb.hparams.SESSION_START_INFO_TAG:
                    data.ParseFromString(value.metadata.plugin_data.content)
        return data

    # -- files --------------------------------------------------------------------------------

    def _write(self, name: str, body: bytes) -> None:
        """Write `body` as `name` in the rank directory: temporary file, fsync, rename."""
        write_atomic(self.path / name, body,
                     tmp_name=f"{TMP_PREFIX}{name.replace('tfevents', 'part')}.{os.getpid()}")
        fsync_dir(self.path)
