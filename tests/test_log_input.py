"""Input a training loop can produce that the journal's columns cannot hold as given: steps
beyond int64 or not whole, lone surrogates (what os.fsdecode makes of bytes that are not UTF-8)
in texts, params and dicts, over-long run ids. Each is refused at log() with a clear error
(names, run ids: identifiers) or stored losslessly in a documented form; the journal stays
readable by `Journal`, `verify` and an export, and good records never pay for a bad neighbour.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from itwinai_journal import Journal, verify
from itwinai_journal.loggers import (
    JournalWarning,
    LoggersCollection,
    MLFlowLogger,
    TensorBoardLogger,
)
from itwinai_sync.cli import main

INT64_MAX = 2**63 - 1


def restore(text: str, meta: dict) -> str:
    """The logged text, from the stored one and meta['surrogates'] (the documented form)."""
    chars = list(text)
    for position, code in meta.get("surrogates", []):
        chars[position] = chr(code)
    return "".join(chars)


def records(savedir: Path) -> list[dict]:
    rows = Journal(savedir).records().to_pylist()
    for r in rows:
        r["meta"] = json.loads(r["meta"]) if r["meta"] else {}
    return rows


def test_steps_outside_int64_or_not_whole_are_kept_in_meta(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path, log_freq="batch", flush_interval=30)
    with logger.start_logging():
        with pytest.warns(JournalWarning, match="not a whole number within int64"):
            logger.log(1.0, "loss", step=2**63)
        logger.log(2.0, "loss", step=-(2**63) - 1)
        logger.log(3.0, "loss", step=INT64_MAX, batch_idx=-(2**63))
        logger.log(4.0, "loss", step=1.5)
        logger.log(5.0, "loss", step=3.0, batch_idx=2**64)
        logger.log(6.0, "loss", step="7")
    got = [(r["value"], r["step"], r["batch_idx"], r["meta"]) for r in records(tmp_path)]
    assert got == [
        (1.0, None, None, {"step": 2**63}),
        (2.0, None, None, {"step": -(2**63) - 1}),
        (3.0, INT64_MAX, -(2**63), {}),
        (4.0, None, None, {"step": 1.5}),
        (5.0, 3, None, {"batch_idx": 2**64}),
        (6.0, None, None, {"step": "7"}),
    ]
    assert verify(tmp_path) == []


def test_a_collection_keeps_steps_beyond_int64_too(tmp_path):
    coll = LoggersCollection([MLFlowLogger(savedir=tmp_path, log_freq="batch"),
                              TensorBoardLogger(savedir=tmp_path, log_freq="batch")])
    with coll.start_logging():
        with pytest.warns(JournalWarning, match="within int64"):
            coll.log(1.0, "loss", step=2**63, batch_idx=3)
        coll.log(2.0, "loss", step=2**40, batch_idx=2**40)
    got = [(r["value"], r["step"], r["batch_idx"], r["meta"]) for r in records(tmp_path)]
    assert got == [(1.0, None, 3, {"step": 2**63}), (2.0, 2**40, 2**40, {})]


def test_a_bad_step_in_a_large_batch_drops_nothing(tmp_path):
    """Batches of >= 256 plain metrics are encoded column-wise: a step beyond int64 among
    them must neither poison the rank nor drop the batch."""
    logger = MLFlowLogger(savedir=tmp_path, log_freq="batch", flush_interval=30)
    with logger.start_logging():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", JournalWarning)
            for i in range(600):
                logger.log(float(i), "loss", step=2**63 + i if i == 300 else i)
    rows = records(tmp_path)
    assert [r["value"] for r in rows] == [float(i) for i in range(600)]
    assert [r["step"] for r in rows] == [i if i != 300 else None for i in range(600)]
    assert rows[300]["meta"] == {"step": 2**63 + 300}
    assert [r["seq"] for r in rows] == list(range(1, 601))
    assert verify(tmp_path) == []


SURROGATE = "caf\udce9"  # os.fsdecode(b"caf\xe9")


def test_lone_surrogates_in_texts_params_and_dicts_are_stored_losslessly(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path, log_freq="batch")
    big = SURROGATE + "x" * (70 * 1024) + "\udcff"
    with logger.start_logging():
        logger.log(1.0, "before")
        with pytest.warns(JournalWarning, match="lone surrogates"):
            logger.log(SURROGATE, "note.txt", kind="text")
        logger.log(big, "big.txt", kind="text")
        logger.log(SURROGATE, "path", kind="param")
        logger.log({SURROGATE: [SURROGATE, 1]}, "d.json", kind="dict")
        logger.save_hyperparameters({"dir": SURROGATE})
        logger.log(2.0, "after")
    rows = records(tmp_path)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["before", "note.txt", "big.txt", "path", "d.json",
                                         "dir", "after"]
    note = by_name["note.txt"]
    assert note["text"] == "caf\ufffd" and note["meta"] == {"surrogates": [[3, 0xDCE9]]}
    assert restore(note["text"], note["meta"]) == SURROGATE
    big_row = by_name["big.txt"]
    (run,) = Journal(tmp_path).runs()
    stored = (run.rank(0).path / "blobs" / big_row["blob"][:2] / big_row["blob"]).read_bytes()
    assert restore(stored.decode(), big_row["meta"]) == big
    for name in ("path", "dir"):
        assert json.loads(restore(by_name[name]["text"], by_name[name]["meta"])) == SURROGATE
        assert json.loads(by_name[name]["text"]) == "caf\ufffd"
    d = by_name["d.json"]
    assert json.loads(restore(d["text"], d["meta"])) == {SURROGATE: [SURROGATE, 1]}
    assert verify(tmp_path) == []
    # an export takes the stored (valid UTF-8) form
    result = CliRunner().invoke(main, [str(tmp_path), "--to", "tensorboard"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["loss\udcff", "\ud800"])
def test_a_name_with_a_lone_surrogate_is_refused(tmp_path, name):
    """A name is an identifier: it is not rewritten, and it cannot be stored."""
    logger = TensorBoardLogger(savedir=tmp_path, log_freq="batch")
    with logger.start_logging():
        logger.log(1.0, "before")
        with pytest.raises(ValueError, match="lone surrogate"):
            logger.log(1.0, name)
        with pytest.raises(ValueError, match="lone surrogate"):
            logger.log([1.0, 2.0], ["fine", name])  # no half of the call is logged
        logger.log(2.0, "after")
    assert [r["name"] for r in records(tmp_path)] == ["before", "after"]


@pytest.mark.parametrize(("run_id", "ok"), [
    ("\N{GRINNING FACE}" * 50, True),   # 200 bytes of UTF-8
    ("\N{GRINNING FACE}" * 51, False),  # 204 bytes, within 200 characters
    ("r" * 200, True),
    ("r" * 201, False),
    ("slurm-1\udcff", False),
])
def test_run_id_limit_is_in_utf8_bytes(tmp_path, run_id, ok):
    """A run id must fit with the suffixes the sync side adds in a 255-byte file name."""
    logger = TensorBoardLogger(savedir=tmp_path, run_id=run_id)
    if not ok:
        with pytest.raises(ValueError, match="run id"):
            logger.create_logger_context()
        assert list(tmp_path.iterdir()) == []
        return
    with logger.start_logging():
        logger.log(1.0, "x")
    (run,) = Journal(tmp_path).runs()
    assert run.run_id == run_id
    result = CliRunner().invoke(main, [str(tmp_path), "--to", "tensorboard"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_experiment_name_limit_is_in_encoded_bytes(tmp_path):
    fits = "\N{GRINNING FACE}" * 16  # 16 x 12 bytes once percent-encoded
    too_long = "\N{GRINNING FACE}" * 17
    with MLFlowLogger(savedir=tmp_path, experiment_name=fits).start_logging() as _:
        pass
    with pytest.raises(ValueError, match="too long"):
        MLFlowLogger(savedir=tmp_path, experiment_name=too_long).create_logger_context()
