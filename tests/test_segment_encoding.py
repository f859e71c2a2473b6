"""The two JSONL encoders (column-wise for large batches of metrics, record by record otherwise)
write the same records, bit for bit, and the writer picks either without the reader noticing."""

import json
import math
import random
import struct

import pytest

from itwinai_journal import Journal
from itwinai_journal.format import segments
from itwinai_journal.loggers import MLFlowLogger
from itwinai_journal.writer.rank import COLUMNAR_BATCH

SPECIALS = [0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, 1.0,
            -3.0, 1e15, 1e16, 0.1, 1e-7, 2.0**53]
NAMES = ["loss", "acc", 'we"ird\\name', "tab\tand\nnewline", "ünï/cödé", "x" * 300]


def _bits(v):
    """Identity of a float down to the sign of zero; every NaN is one NaN."""
    return "nan" if isinstance(v, float) and math.isnan(v) else struct.pack("<d", float(v))


def _records(n, seed=7, names=NAMES):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            value = rnd.choice(SPECIALS)
        else:
            value = struct.unpack("<d", rnd.randbytes(8))[0]
            if math.isnan(value):
                value = math.nan
        step = None if i % 5 == 0 else rnd.randint(-(2**62), 2**62)
        batch_idx = None if i % 4 else i
        out.append((1.7e9 + rnd.random() * 1e6, rnd.choice(names), step, batch_idx, value, "r"))
    return out


def _parsed(line):
    d = json.loads(line)
    return {k: (_bits(v) if k in ("time", "value") else v) for k, v in d.items()}


def test_columnar_lines_parse_to_the_same_records_as_encode_row():
    recs = _records(5000)
    table, data = segments.encode_metrics(101, recs, {})
    lines = data.to_pybytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(recs) + 1
    for seq, (line, (t, name, step, batch_idx, value, _)) in enumerate(zip(lines, recs), 101):
        row = (seq, t, "metric", name, step, batch_idx, value, None, None, None)
        assert _parsed(line) == _parsed(segments.encode_row(row)), line


def test_columnar_table_equals_the_row_table_and_the_jsonl_read_back(tmp_path):
    recs = _records(3000, seed=11)
    table, data = segments.encode_metrics(1, recs, {})
    rows = [(s, t, "metric", nm, st, b, v, None, None, None)
            for s, (t, nm, st, b, v, _) in enumerate(recs, 1)]
    expected = segments.rows_to_table(rows)
    path = tmp_path / "000001.jsonl"
    path.write_bytes(data.to_pybytes())
    read_back = segments.rows_to_table(segments.read_jsonl(path).rows)
    for got in (table, read_back):
        assert got.schema == expected.schema
        for col in expected.column_names:
            want = expected[col].to_pylist()
            have = got[col].to_pylist()
            if col in ("time", "value"):
                want, have = list(map(_bits, want)), list(map(_bits, have))
            assert have == want, col


@pytest.mark.parametrize("per_flush", [3, COLUMNAR_BATCH * 4])
def test_writer_keeps_exact_values_through_both_encoders_and_sealing(tmp_path, per_flush):
    """Batches below COLUMNAR_BATCH go record by record, larger ones column-wise; a mixed batch
    (a param among metrics) goes record by record. Active and sealed reads are exact."""
    loggable = [n for n in NAMES if n.isprintable()]  # loggers refuse control characters
    recs = _records(4 * COLUMNAR_BATCH * 4, seed=3, names=loggable)
    lg = MLFlowLogger(savedir=tmp_path, experiment_name="e", run_id="r", log_freq="batch",
                      flush_interval=3600)
    lg.create_logger_context()
    writer = lg._writer
    expected = []
    for k in range(0, len(recs), per_flush):
        for _, name, step, _, value, _ in recs[k:k + per_flush]:
            lg.log(value, name, step=step)
            expected.append((name, step, _bits(value)))
        if k == per_flush:
            lg.log({"lr": 0.1}, "hparams", kind="param")
        writer.flush()

    def got(table):
        return list(zip(table["name"].to_pylist(), table["step"].to_pylist(),
                        map(_bits, table["value"].to_pylist())))

    active = Journal(tmp_path).metrics()
    assert got(active) == expected
    param_seq = 2 * per_flush + 1
    assert active["seq"].to_pylist() == [s for s in range(1, len(expected) + 2) if s != param_seq]
    lg.destroy_logger_context()
    sealed = Journal(tmp_path).metrics()
    assert got(sealed) == expected
    params = Journal(tmp_path).records(kinds=["param"])
    assert params["seq"].to_pylist() == [param_seq]


def test_a_bad_item_in_a_list_fails_the_call_and_logs_none_of_it(tmp_path):
    lg = MLFlowLogger(savedir=tmp_path, experiment_name="e", run_id="r", log_freq="batch")
    lg.create_logger_context()
    lg.log(1.0, "before", step=0)
    with pytest.raises(ValueError, match="lone surrogate"):
        lg.log([1.0, 2.0], ["a", "b\udcff"], step=1)
    lg.log([2.0, 3.0], ["a", "b"], step=2)
    lg.destroy_logger_context()
    table = Journal(tmp_path).metrics()
    assert list(zip(table["name"].to_pylist(), table["value"].to_pylist())) == [
        ("before", 1.0), ("a", 2.0), ("b", 3.0)]
