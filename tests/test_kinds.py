"""Every logger kind round-trips through the journal: what `log()` captured is what
`itwinai_journal.Journal(savedir).records()` gives back, with exact values, steps, batch
indices, blob bytes and meta. Real journals on disk (tmp_path), read back after
`destroy_logger_context()` (which flushes and seals), unless a test says otherwise."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itwinai_journal import Journal
from itwinai_journal.loggers import (
    MLFlowLogger,
    Prov4MLLogger,
    TensorBoardLogger,
    WandBLogger,
)


@pytest.fixture
def mlf(tmp_path):
    """An initialized MLFlowLogger that logs every batch; destroyed at teardown if a test
    did not read it back."""
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", experiment_name="kinds", log_freq="batch")
    logger.create_logger_context()
    yield logger
    if logger.is_initialized:
        logger.destroy_logger_context()


@pytest.fixture
def prov(tmp_path):
    logger = Prov4MLLogger(provenance_save_dir=str(tmp_path / "mllogs" / "prov_logs"),
                           experiment_name="prov-kinds", log_freq="batch")
    logger.create_logger_context()
    yield logger
    if logger.is_initialized:
        logger.destroy_logger_context()


def read_back(logger) -> list[dict]:
    """Close the logger's session (flush + seal) and return every record of its journal."""
    logger.destroy_logger_context()
    return Journal(logger.journal_savedir).records().to_pylist()


def only(records: list[dict], name: str) -> dict:
    found = [r for r in records if r["name"] == name]
    assert len(found) == 1, f"expected one record named {name!r}, got {len(found)}"
    return found[0]


def meta(record: dict) -> dict | None:
    return None if record["meta"] is None else json.loads(record["meta"])


def blob(logger, sha: str) -> bytes:
    """Bytes of a blob of the logger's (single) run, checked against its content address."""
    assert isinstance(sha, str) and len(sha) == 64
    (run,) = Journal(logger.journal_savedir).runs()
    data = (run.rank(0).path / "blobs" / sha[:2] / sha).read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha
    return data


def png_pixels(data: bytes) -> tuple[Image.Image, np.ndarray]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image, np.asarray(image)


class TinyNet(torch.nn.Module):
    """A custom module (class identity must survive the round trip) with a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, kernel_size=3)
        self.head = torch.nn.Linear(8, 3, bias=False)
        self.register_buffer("running", torch.arange(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        return self.head(self.conv(x).flatten(1))


class Opaque:
    """An object JSON cannot hold; its str() is what a param of it is logged as."""

    def __str__(self) -> str:
        return "Opaque(lr=3)"


# --------------------------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------------------------

METRIC_CASES = [
    ("py_int", 7, 7.0),
    ("py_big_int", 2**53, float(2**53)),
    ("py_neg_float", -0.1, -0.1),
    ("py_bool_true", True, 1.0),
    ("py_bool_false", False, 0.0),
    ("np_float32", np.float32(0.1), 0.10000000149011612),
    ("np_float64", np.float64(1 / 3), 1 / 3),
    ("np_int64", np.int64(2**40 + 1), 1099511627777.0),
    ("np_0d_array", np.array(2.5), 2.5),
    ("torch_0d_float32", torch.tensor(0.1), 0.10000000149011612),
    ("torch_0d_float64", torch.tensor(0.1, dtype=torch.float64), 0.1),
    ("torch_0d_int64", torch.tensor(-3), -3.0),
    ("torch_0d_grad", torch.tensor(1.5, requires_grad=True) * 2, 3.0),
]


def test_metric_values_steps_and_batch_idx_round_trip(mlf):
    for i, (name, item, _) in enumerate(METRIC_CASES):
        mlf.log(item, name, step=i, batch_idx=100 + i)
    records = read_back(mlf)
    got = [(r["kind"], r["name"], r["step"], r["batch_idx"], r["value"]) for r in records]
    want = [("metric", name, i, 100 + i, value)
            for i, (name, _, value) in enumerate(METRIC_CASES)]
    assert got == want
    assert all(type(r["value"]) is float for r in records)
    assert [r["seq"] for r in records] == list(range(1, len(METRIC_CASES) + 1))
    assert all(r["text"] is None and r["blob"] is None and r["meta"] is None for r in records)
    assert {(r["experiment"], r["rank"]) for r in records} == {("kinds", 0)}
    # float32 inputs are widened exactly, not re-rounded through decimal text
    assert only(records, "np_float32")["value"] != 0.1


def test_metric_without_step_and_with_numpy_indices(mlf):
    mlf.log(1.5, "no_index")
    mlf.log(2.5, "np_index", step=np.int64(4), batch_idx=np.int32(9))
    mlf.log(3.5, "torch_index", step=torch.tensor(5), batch_idx=0)
    records = read_back(mlf)
    got = [(r["name"], r["step"], r["batch_idx"], r["value"]) for r in records]
    assert got == [("no_index", None, None, 1.5), ("np_index", 4, 9, 2.5),
                   ("torch_index", 5, 0, 3.5)]


#: Metric items that are not one real number: kept losslessly as a `text` record holding
#: their JSON (W&B and Prov4ML take such values; MLflow and TensorBoard refuse them).
NOT_A_NUMBER = [
    pytest.param("abc", '"abc"', "builtins.str", id="word"),
    pytest.param([1.0, 2.0], "[1.0, 2.0]", "builtins.list", id="list"),
    pytest.param(torch.tensor([1.0, 2.0]), "[1.0, 2.0]", "torch.Tensor", id="2-element-tensor"),
    pytest.param(np.array([1.0, 2.0]), "[1.0, 2.0]", "numpy.ndarray", id="numpy-vector"),
    pytest.param(None, "null", "builtins.NoneType", id="none"),
    pytest.param(Opaque(), '"Opaque(lr=3)"', "test_kinds.Opaque", id="not-json"),
]


@pytest.mark.parametrize(("item", "text", "qualname"), NOT_A_NUMBER)
@pytest.mark.parametrize("path", ["plain", "with-kwargs"])
def test_metric_that_is_not_a_number_is_a_text_record(mlf, item, text, qualname, path):
    extra = {} if path == "plain" else {"step": np.int64(1), "note": "x"}
    mlf.log(1.0, "before", step=0)
    with pytest.warns(UserWarning, match="is not a number"):
        mlf.log(item, "odd", **extra)
    mlf.log(2.0, "after", step=2)
    records = read_back(mlf)
    assert [(r["kind"], r["name"], r["step"], r["value"], r["text"]) for r in records] == [
        ("metric", "before", 0, 1.0, None), ("text", "odd", extra.get("step"), None, text),
        ("metric", "after", 2, 2.0, None)]
    odd = meta(records[1])
    assert odd["logged_as"] == "metric" and odd["type"] == qualname
    if path == "with-kwargs":
        assert odd["kwargs"] == {"note": "x"}
    assert [r["seq"] for r in records] == [1, 2, 3]


def test_one_element_arrays_and_every_numeric_type_are_metrics(mlf):
    import decimal
    import fractions

    values = [torch.tensor([0.5]), torch.tensor([[0.25]]), np.array([0.5]), np.array([[2.0]]),
              torch.tensor(3), torch.tensor(True), np.bool_(True), np.float16(0.5),
              np.uint64(2**63), np.int8(-3), np.longdouble(0.5), decimal.Decimal("0.25"),
              fractions.Fraction(1, 4), "0.5", np.complex128(1.5 + 0j), 1.5 + 0j, 2**70]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, value in enumerate(values):
            mlf.log(value, f"m{i}", step=i)
    records = read_back(mlf)
    assert [r["value"] for r in records] == [
        0.5, 0.25, 0.5, 2.0, 3.0, 1.0, 1.0, 0.5, 9.223372036854776e18, -3.0, 0.5, 0.25, 0.25,
        0.5, 1.5, 1.5, 1.1805916207174113e21]
    assert all(r["kind"] == "metric" and r["meta"] is None for r in records)


@pytest.mark.parametrize("item", [np.complex128(1.5 + 2j), 1.5 + 2j, torch.tensor(1.5 + 2j)],
                         ids=["numpy", "python", "torch"])
def test_complex_metric_keeps_its_imaginary_part(mlf, item):
    with pytest.warns(UserWarning, match="complex"):
        mlf.log(item, "z", step=3)
    (record,) = read_back(mlf)
    assert (record["kind"], record["value"], record["step"]) == ("metric", 1.5, 3)
    assert meta(record) == {"imag": 2.0}


def test_metric_nan_and_inf_are_stored_as_such(mlf):
    mlf.log(float("nan"), "nan")
    mlf.log(float("inf"), "inf")
    mlf.log(float("-inf"), "neg_inf")
    mlf.log(np.float32("nan"), "np_nan", step=np.int64(1))  # the general (non-hot) path
    mlf.log(torch.tensor(float("inf")), "torch_inf", step=1, batch_idx=1)
    records = read_back(mlf)
    values = {r["name"]: r["value"] for r in records}
    assert list(values) == ["nan", "inf", "neg_inf", "np_nan", "torch_inf"]
    assert math.isnan(values["nan"]) and math.isnan(values["np_nan"])
    assert values["inf"] == math.inf and values["torch_inf"] == math.inf
    assert values["neg_inf"] == -math.inf


def test_nan_and_inf_readable_from_the_active_segment(tmp_path):
    """Before the session is sealed, the JSONL segment holds NaN/inf too (readers see them)."""
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", flush_interval=0.05)
    logger.create_logger_context()
    try:
        logger.log(float("nan"), "a")
        logger.log(float("-inf"), "b", step=np.int64(3))
        deadline = time.monotonic() + 10
        while True:
            records = Journal(logger.journal_savedir).records().to_pylist()
            if len(records) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        seg_dir = Journal(logger.journal_savedir).runs()[0].rank(0).path / "segments"
        assert [p.suffix for p in seg_dir.iterdir()] == [".jsonl"]
        assert [r["name"] for r in records] == ["a", "b"]
        assert math.isnan(records[0]["value"])
        assert records[1]["value"] == -math.inf and records[1]["step"] == 3
    finally:
        logger.destroy_logger_context()


# --------------------------------------------------------------------------------------------
# param, text, dict
# --------------------------------------------------------------------------------------------


def test_param_values(mlf):
    params = {"epochs": 10, "lr": 0.001, "optim": "adam", "layers": [64, 32, "relu"],
              "flag": True, "none": None}
    for name, value in params.items():
        mlf.log(value, name, kind="param")
    mlf.log(Opaque(), "opaque", kind="param")
    records = read_back(mlf)
    assert [r["name"] for r in records] == [*params, "opaque"]
    assert all(r["kind"] == "param" and r["value"] is None and r["blob"] is None
               for r in records)
    for name, value in params.items():
        record = only(records, name)
        decoded = json.loads(record["text"])
        assert decoded == value and type(decoded) is type(value)
        assert record["meta"] is None
    opaque = only(records, "opaque")
    assert json.loads(opaque["text"]) == "Opaque(lr=3)"
    assert meta(opaque) == {"stringified": "Opaque"}


def test_text_inline_and_large_text_in_blob(mlf):
    small = "héllo\nwörld ✓ \"quoted\" \\ back"
    at_limit = "x" * (64 * 1024)
    large = "é" * (64 * 1024) + "tail"
    mlf.log(small, "small", kind="text")
    mlf.log(at_limit, "at_limit", kind="text")
    mlf.log(large, "large", kind="text", step=3)
    records = read_back(mlf)
    for name, text in (("small", small), ("at_limit", at_limit)):
        record = only(records, name)
        assert (record["kind"], record["text"], record["blob"], record["meta"]) == (
            "text", text, None, None)
    big = only(records, "large")
    assert big["text"] is None and big["step"] == 3
    assert blob(mlf, big["blob"]) == large.encode("utf-8")
    assert blob(mlf, big["blob"]).decode("utf-8") == large
    assert meta(big)["media_type"] == "text/plain"
    assert meta(big)["size"] == len(large.encode("utf-8"))


def test_text_must_be_a_string(mlf):
    with pytest.raises(TypeError):
        mlf.log(b"bytes", "t", kind="text")
    assert read_back(mlf) == []


def test_dict_json_equality(mlf):
    value = {"a": 1, "b": [1, 2.5, "x"], "c": {"d": None, "e": True}, "unicode": "ñ"}
    mlf.log(value, "cfg", kind="dict", step=2)
    mlf.log({}, "empty", kind="dict")
    records = read_back(mlf)
    cfg = only(records, "cfg")
    assert cfg["kind"] == "dict" and cfg["step"] == 2 and cfg["blob"] is None
    assert json.loads(cfg["text"]) == value
    assert json.loads(only(records, "empty")["text"]) == {}


def test_dict_json_cannot_hold_is_journaled_as_its_repr(mlf):
    """kind='dict' with what JSON cannot hold (an object, a tuple key, a dict or list holding
    itself) is journaled as the JSON of its str(), the repr of a container, flagged
    meta['stringified'], with one warning; a JSON value that is not a dict (MLflow's log_dict
    takes a list) is kept as JSON. Nothing raises, nothing recurses for ever."""
    cyclic: dict = {"a": 1}
    cyclic["self"] = cyclic
    looped: list = [1]
    looped.append(looped)

    class Obj:
        def __repr__(self) -> str:
            return "Obj()"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlf.log({"ok": 1}, "good", kind="dict")
        mlf.log({"bad": Obj()}, "object", kind="dict")
        mlf.log({(1, 2): 3}, "tuple_key", kind="dict")
        mlf.log(cyclic, "cyclic", kind="dict")
        mlf.log(looped, "looped", kind="dict")
        mlf.log([("a", 1)], "list", kind="dict")
    said = [str(w.message) for w in caught if "JSON cannot hold the dict" in str(w.message)]
    assert len(said) == 1 and "'object'" in said[0]
    got = {r["name"]: (json.loads(r["text"]), meta(r)) for r in read_back(mlf)}
    assert got == {
        "good": ({"ok": 1}, None),
        "object": ("{'bad': Obj()}", {"stringified": "dict"}),
        "tuple_key": ("{(1, 2): 3}", {"stringified": "dict"}),
        "cyclic": ("{'a': 1, 'self': {...}}", {"stringified": "dict"}),
        "looped": ("[1, [...]]", {"stringified": "list"}),
        "list": ([["a", 1]], None),
    }


def test_self_referencing_params_are_journaled_as_their_repr(mlf, monkeypatch):
    """A param (log or save_hyperparameters) holding itself is journaled as its repr, as
    MLflow's str() would send it; a secret inside one is still redacted, in the copy the
    repr is taken of (never the original it refers to)."""
    looped: list = [1]
    looped.append(looped)
    cyclic: dict = {"lr": 0.1}
    cyclic["self"] = cyclic
    secret: dict = {"api_key": "hunter2", "url": "https://u:pw@host/x"}
    secret["self"] = secret
    mlf.log(looped, "looped", kind="param")
    mlf.save_hyperparameters({"cyclic": cyclic, "secret": secret})
    got = {r["name"]: (json.loads(r["text"]), meta(r)) for r in read_back(mlf)}
    assert got == {
        "looped": ("[1, [...]]", {"stringified": "list"}),
        "cyclic": ("{'lr': 0.1, 'self': {...}}", {"stringified": "dict"}),
        "secret": ("{'api_key': '<redacted>', 'url': 'https://host/x', 'self': {...}}",
                   {"stringified": "dict"}),
    }


def test_empty_names_are_journaled_as_given_with_one_warning(mlf, tmp_path):
    """'' as a metric name (fast path and slow path), a param, a dict, a text or an artifact
    identifier: journaled as '' (TensorBoard takes it; the MLflow export maps it), said once
    per logger; the call never fails."""
    path = tmp_path / "f.txt"
    path.write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlf.log(1.0, "", step=1)
        mlf.log(2.0, "", step=2**40)
        mlf.log([3.0], [""], step=3)
        mlf.log(4, "", kind="param")
        mlf.log({"a": 1}, "", kind="dict")
        mlf.log("t", "", kind="text")
        mlf.log(str(path), "", kind="artifact")
    said = [w for w in caught if "empty metric name ('') is journaled as given" in
            str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    assert not [w for w in caught if "empty" in str(w.message) and w not in said]
    got = [(r["kind"], r["name"], r["step"], r["value"]) for r in read_back(mlf)]
    assert got == [("metric", "", 1, 1.0), ("metric", "", 2**40, 2.0), ("metric", "", 3, 3.0),
                   ("param", "", None, None), ("dict", "", None, None),
                   ("text", "", None, None), ("artifact", "", None, None)]


# --------------------------------------------------------------------------------------------
# artifact
# --------------------------------------------------------------------------------------------


def test_artifact_file(mlf, tmp_path):
    data = os.urandom(5000) + b"\x00end"
    src = tmp_path / "inputs" / "weights.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    mlf.log(str(src), "outputs/weights.bin", kind="artifact", step=1)
    mlf.log(src, "as_path", kind="artifact")
    records = read_back(mlf)
    first, second = records
    assert (first["kind"], first["name"], first["step"]) == ("artifact", "outputs/weights.bin", 1)
    assert first["blob"] == second["blob"] == hashlib.sha256(data).hexdigest()
    assert blob(mlf, first["blob"]) == data
    assert meta(first)["file_name"] == "weights.bin"
    assert meta(first)["type"] == "file"
    assert meta(first)["size"] == len(data)


def test_artifact_directory_tree(mlf, tmp_path):
    root = tmp_path / "ckpt"
    files = {
        "a.txt": b"alpha",
        "sub/b.bin": os.urandom(300),
        "sub/deeper/c.json": b'{"c": 1}',
        "sub/empty.dat": b"",
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    (root / "empty_dir").mkdir()
    mlf.log(str(root), "checkpoint", kind="artifact")
    (record,) = read_back(mlf)
    assert meta(record)["type"] == "directory"
    assert meta(record)["dir_name"] == "ckpt"
    assert meta(record)["files"] == len(files)
    listing = json.loads(blob(mlf, record["blob"]))
    entries = {e["path"]: e for e in listing["files"]}
    assert sorted(entries) == sorted(files)
    for rel, content in files.items():
        assert entries[rel]["sha256"] == hashlib.sha256(content).hexdigest()
        assert entries[rel]["size"] == len(content)
        assert blob(mlf, entries[rel]["sha256"]) == content


def test_artifact_object_is_pickled(mlf):
    obj = {"weights": [1, 2, 3], "name": "x", "nested": (1.5, None)}
    mlf.log(obj, "state", kind="artifact")
    (record,) = read_back(mlf)
    assert pickle.loads(blob(mlf, record["blob"])) == obj
    assert meta(record)["type"] == "pickle"


def test_artifact_missing_path(mlf, tmp_path):
    with pytest.raises(FileNotFoundError):
        mlf.log(str(tmp_path / "nope.txt"), "nope", kind="artifact")
    with pytest.raises(FileNotFoundError):
        mlf.log(tmp_path / "nope_dir", "nope2", kind="artifact")
    assert read_back(mlf) == []


@pytest.mark.parametrize("identifier", ["../escape.txt", "a/../../b.txt", "..",
                                        "/abs/path.txt", "/tmp/x"])
def test_artifact_identifier_must_stay_relative(mlf, tmp_path, identifier):
    src = tmp_path / "f.txt"
    src.write_bytes(b"data")
    with pytest.raises(ValueError):
        mlf.log(str(src), identifier, kind="artifact")
    assert read_back(mlf) == []


# --------------------------------------------------------------------------------------------
# torch, figure, image
# --------------------------------------------------------------------------------------------


def test_torch_objects(mlf):
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    state = {"w": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16), "step": 3}
    mlf.log(tensor, "tensor", kind="torch", step=5)
    mlf.log(state, "state", kind="torch")
    records = read_back(mlf)
    rec_t, rec_s = only(records, "tensor"), only(records, "state")
    assert (rec_t["kind"], rec_t["step"]) == ("torch", 5)
    loaded = torch.load(io.BytesIO(blob(mlf, rec_t["blob"])))
    assert loaded.dtype == torch.float32 and torch.equal(loaded, tensor)
    loaded_state = torch.load(io.BytesIO(blob(mlf, rec_s["blob"])))
    assert loaded_state.keys() == state.keys() and loaded_state["step"] == 3
    assert loaded_state["w"].dtype == torch.int16 and torch.equal(loaded_state["w"], state["w"])


def test_figure_matplotlib(mlf):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=50)
    fig.add_subplot().plot([0, 1, 2], [2, 0, 1])
    mlf.log(fig, "curve", kind="figure", step=1)
    (record,) = read_back(mlf)
    assert (record["kind"], record["name"], record["step"]) == ("figure", "curve", 1)
    image, _ = png_pixels(blob(mlf, record["blob"]))
    assert image.size == (200, 150)
    assert (meta(record)["width"], meta(record)["height"]) == image.size
    assert meta(record)["media_type"] == "image/png"


def test_figure_plotly(mlf):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2], name="s"))
    mlf.log(fig, "plotly", kind="figure")
    (record,) = read_back(mlf)
    doc = json.loads(blob(mlf, record["blob"]))
    assert "data" in doc
    assert doc == json.loads(fig.to_json())
    assert doc["data"][0]["name"] == "s"
    assert meta(record)["figure"] == "plotly"


def test_figure_rejects_other_objects(mlf):
    with pytest.raises(TypeError):
        mlf.log({"not": "a figure"}, "fig", kind="figure")
    assert read_back(mlf) == []


def _image_cases():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(6, 4), dtype=np.uint8)
    hwc = rng.random((4, 5, 3))
    hwc[0, 0] = [0.0, 1.0, 0.5]
    # exact binary fractions: x*255 is exact in float32 and float64 alike
    chw = (rng.integers(0, 257, size=(3, 4, 6)) / 256).astype(np.float32)
    return [
        pytest.param(Image.fromarray(rgb, mode="RGB"), rgb, "RGB", id="pil-rgb"),
        pytest.param(gray, gray, "L", id="numpy-hw-uint8"),
        pytest.param(hwc, np.round(hwc * 255).astype(np.uint8), "RGB", id="numpy-hwc-float"),
        pytest.param(torch.from_numpy(chw),
                     np.round(np.moveaxis(chw.astype(np.float64), 0, -1) * 255).astype(np.uint8),
                     "RGB", id="torch-chw-float"),
    ]


@pytest.mark.parametrize(("item", "expected", "mode"), _image_cases())
def test_image_pixels_round_trip(mlf, item, expected, mode):
    mlf.log(item, "img", kind="image", step=2)
    (record,) = read_back(mlf)
    assert (record["kind"], record["step"]) == ("image", 2)
    image, pixels = png_pixels(blob(mlf, record["blob"]))
    assert image.mode == mode
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, expected)
    assert (meta(record)["width"], meta(record)["height"]) == (expected.shape[1],
                                                              expected.shape[0])
    assert meta(record)["media_type"] == "image/png"


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(np.full((3, 3, 3), 1.5), id="numpy-above-1"),
        pytest.param(np.full((3, 3), -0.1), id="numpy-below-0"),
        pytest.param(torch.full((3, 2, 2), 2.0), id="torch-above-1"),
    ],
)
def test_float_image_out_of_range(mlf, item):
    with pytest.raises(ValueError):
        mlf.log(item, "img", kind="image")
    assert read_back(mlf) == []


# --------------------------------------------------------------------------------------------
# model, best_model
# --------------------------------------------------------------------------------------------


def _assert_same_module(loaded, model):
    assert type(loaded) is type(model)
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_model(mlf):
    torch.manual_seed(0)
    model = TinyNet()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2 * 1 * 3 * 3 + 2 + 8 * 3
    mlf.log(model, "net", kind="model", step=7)
    (record,) = read_back(mlf)
    assert (record["kind"], record["name"], record["step"]) == ("model", "net", 7)
    loaded = torch.load(io.BytesIO(blob(mlf, record["blob"])), weights_only=False)
    _assert_same_module(loaded, model)
    assert meta(record)["class"] == f"{TinyNet.__module__}.TinyNet"
    assert meta(record)["parameters"] == n_params


def test_mlflow_ignores_a_model_that_is_not_a_module(mlf, caplog):
    """As itwinai's MLFlowLogger: a warning through its logger, nothing logged."""
    with caplog.at_level(logging.WARNING, logger="itwinai_journal.loggers"):
        mlf.log({"w": torch.zeros(2)}, "net", kind="model")
    assert [r.getMessage() for r in caplog.records] == ["Unrecognized model type."]
    assert read_back(mlf) == []


def test_prov4ml_model_must_be_a_module(prov):
    with pytest.raises(TypeError):
        prov.log({"w": torch.zeros(2)}, "net", kind="model")
    assert read_back(prov) == []


def test_best_model_with_context(prov):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    prov.log(model, "best", kind="best_model", step=3, context="validation")
    prov.log(model, "best_default", kind="best_model")
    prov.log(0.25, "loss", step=1, context="evaluation")
    records = read_back(prov)
    best = only(records, "best")
    assert (best["kind"], best["step"], best["experiment"]) == ("best_model", 3, "prov-kinds")
    loaded = torch.load(io.BytesIO(blob(prov, best["blob"])), weights_only=False)
    _assert_same_module(loaded, model)
    assert meta(best)["class"] == "torch.nn.modules.container.Sequential"
    assert meta(best)["parameters"] == 4 * 3 + 3 + 3 * 2 + 2
    assert meta(best)["context"] == "validation"
    assert "context" not in meta(only(records, "best_default"))  # the default: not stored
    loss = only(records, "loss")
    assert (loss["value"], loss["step"], meta(loss)) == (0.25, 1, {"context": "evaluation"})
    # the Prov4ML journal under mllogs/prov_logs is found from mllogs/
    assert len(Journal(Path(prov.savedir).parent).records()) == 3


def test_prov_context_none_is_not_the_string_none(prov):
    prov.log(0.5, "loss", context=None)
    (record,) = read_back(prov)
    assert (meta(record) or {}).get("context") is None


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")  # mlflow/pandas deprecation and schema hints
def test_dataset_mlflow(mlf):
    import mlflow.data
    import pandas as pd

    df = pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]})
    dataset = mlflow.data.from_pandas(df, name="iris")
    mlf.log(dataset, "iris_ds", kind="dataset")
    (record,) = read_back(mlf)
    desc = json.loads(record["text"])
    expected = dataset.to_dict()
    extra = set(desc) - set(expected)
    assert len(extra) == 1
    (extra_key,) = extra
    assert {k: v for k, v in desc.items() if k != extra_key} == expected
    assert desc["name"] == "iris"
    assert meta(record) == {"dataset": "mlflow"}


@pytest.mark.parametrize("item", [[1, 2, 3], np.zeros((3, 2))], ids=["list", "numpy"])
def test_mlflow_ignores_a_dataset_that_is_not_an_mlflow_dataset(mlf, caplog, item):
    """As itwinai's MLFlowLogger: a warning through its logger, nothing logged."""
    with caplog.at_level(logging.WARNING, logger="itwinai_journal.loggers"):
        mlf.log(item, "ds", kind="dataset")
    assert [r.getMessage() for r in caplog.records] == [
        "Unrecognized dataset type. Must be an MLFlow dataset"]
    assert read_back(mlf) == []


# --------------------------------------------------------------------------------------------
# unknown or unsupported kinds (Prov4ML's measured kinds, flops_pb ... prov_documents, are
# covered by tests/test_measured_kinds.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["metrics", "Metric", "", "histogram", "model_version"])
def test_unknown_kind_is_ignored_with_one_warning(mlf, kind):
    """itwinai ignores kinds it does not know (its 3DGAN use case logs 'model_version')."""
    mlf.log(0.5, "before")
    with pytest.warns(UserWarning, match=f"kind={kind!r} is an unknown kind"):
        mlf.log(1.0, "x", kind=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per kind, not at every call
        mlf.log(1.0, "x", kind=kind, step=1)
    mlf.log(0.5, "after")
    assert [r["name"] for r in read_back(mlf)] == ["before", "after"]


@pytest.mark.parametrize(
    ("logger_cls", "kwargs", "kind", "item"),
    [
        pytest.param(TensorBoardLogger, {}, "param", 0.1, id="tensorboard-param"),
        pytest.param(TensorBoardLogger, {}, "dict", {"a": 1}, id="tensorboard-dict"),
        pytest.param(MLFlowLogger, {}, "best_model", torch.nn.Linear(1, 1), id="mlflow-best"),
        pytest.param(WandBLogger, {}, "artifact", "missing-file", id="wandb-artifact"),
    ],
)
def test_known_but_unsupported_kind_writes_nothing(tmp_path, logger_cls, kwargs, kind, item):
    logger = logger_cls(savedir=tmp_path / "mllogs", **kwargs)
    assert kind not in logger.supported_kinds
    logger.create_logger_context()
    with pytest.warns(UserWarning, match=kind):
        logger.log(item, "x", kind=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per kind, not at every call
        logger.log(item, "x", kind=kind)
    assert read_back(logger) == []
