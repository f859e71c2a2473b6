"""Turning a logged object into journal fields, at `log()` time, one function per kind.

Every function returns `Captured(value, text, blob, meta)`. Libraries (torch, numpy, PIL,
matplotlib, plotly, pandas) are imported only when an object of theirs arrives, and no tracker
library is ever imported: the exporters decide later how each kind is shown in each tracker.
The measured kinds (measure.py) and `watch` (watch.py) build on this module; `kinds.CAPTURE`
maps every kind to its function.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from itwinai_journal.errors import ItwinaiSyncError
from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.names import SURROGATE
from itwinai_journal.format.redaction import redact_param
from itwinai_journal.format.schema import INT64_MAX, INT64_MIN

#: Text longer than this goes to the blob store rather than into a JSONL line.
INLINE_TEXT_LIMIT = 64 * 1024


#: Keyword arguments the user passed to `log()` beyond the standard ones.
Options = dict[str, Any]


class Captured(NamedTuple):
    value: float | None = None
    text: str | None = None
    blob: str | None = None
    meta: dict[str, Any] | None = None


def module_of(obj: Any) -> str:
    """The top-level package of `obj`'s type ('numpy', 'torch', 'PIL'...), without importing
    it."""
    return type(obj).__module__.split(".", 1)[0]


class NotAPlainMetric(ItwinaiSyncError, TypeError):
    """`metric_value` got something that is not one real number: a complex number with an
    imaginary part, or not a number at all. `metric_fields` says how such a metric is kept."""


def _one_element(item: Any) -> Any:
    """The element of a one-element numpy array or torch tensor (any shape), as a numpy or
    Python scalar; anything else unchanged. Trackers take these as numbers: MLflow through
    float(), TensorBoard and W&B by squeezing them."""
    mod = module_of(item)
    if mod == "numpy":
        if getattr(item, "ndim", 0) and item.size == 1:
            return item.reshape(()).item() if item.dtype.kind in "biufc" else item.flat[0]
    elif mod == "torch":
        import torch

        if isinstance(item, torch.Tensor) and item.numel() == 1:
            return item.detach().reshape(()).cpu().item()
    return item


def _is_complex(number: Any) -> bool:
    return isinstance(number, complex) or (
        module_of(number) == "numpy" and getattr(number, "dtype", None) is not None
        and number.dtype.kind == "c")


def metric_value(item: Any) -> float:
    """A metric as float64: anything MLflow's `float()` takes (Python and numpy numbers of
    every width, bool, Decimal, Fraction, numeric strings), one-element arrays and tensors of
    any shape and dtype, and complex numbers whose imaginary part is 0. Anything else raises
    NotAPlainMetric (a TypeError)."""
    if isinstance(item, (int, float)):
        try:
            return float(item)
        except OverflowError:
            raise NotAPlainMetric(f"the int {item} is beyond float64") from None
    number = _one_element(item)
    if _is_complex(number):
        if number.imag == 0:
            return float(number.real)
        raise NotAPlainMetric(f"a complex number with an imaginary part: {number!r}")
    if not isinstance(number, (list, tuple, dict, set)) and number is not None:
        try:
            return float(number)
        except (TypeError, ValueError, OverflowError):
            pass
    raise NotAPlainMetric(f"not a number: {type(item).__name__}")


def metric_fields(item: Any, blobs: BlobStore) -> tuple[str, Captured, str | None]:
    """(kind, fields, why) of a metric record. A real number is a plain metric (why is None).
    A complex number keeps its real part as the value and its imaginary part in
    meta['imag']: trackers get the real part, as MLflow's float() gives it. Anything else
    (a string, a list, a tensor of several elements, None...) is journaled losslessly as a
    `text` record holding its JSON (its str() when JSON cannot hold it), with
    meta['logged_as'] = 'metric': W&B and Prov4ML take such values, MLflow and TensorBoard
    refuse them, and the journal refuses nothing it can store."""
    try:
        return "metric", Captured(value=metric_value(item)), None
    except NotAPlainMetric:
        pass
    number = _one_element(item)
    if _is_complex(number):
        return ("metric", Captured(value=float(number.real), meta={"imag": float(number.imag)}),
                "is a complex number: its real part is the value, meta['imag'] keeps the "
                "imaginary part")
    return ("text", json_text_fields(item, blobs, "metric"),
            f"is not a number ({type(item).__name__}): journaled as a text record of its JSON "
            "(meta['logged_as'] = 'metric'), which W&B and Prov4ML show as the value, "
            "TensorBoard as text and MLflow as a text artifact")


def json_text_fields(item: Any, blobs: BlobStore, logged_as: str) -> Captured:
    """The fields of a `text` record holding `item`'s JSON (its str() when JSON cannot hold
    it), for an object logged as `logged_as` that the journal cannot keep as that kind."""
    text, meta = _json_or_str(item)
    cap = text_fields(text, blobs, "application/json")
    meta = {**(cap.meta or {}), **meta, "logged_as": logged_as, "type": _qualname(item)}
    return Captured(cap.value, cap.text, cap.blob, meta)


def index_value(value: Any) -> tuple[int | None, Any]:
    """`step` or `batch_idx` for the journal's int64 column: (the integer, None); or, when the
    value is not a whole number within int64 (1.5, 2**63, '3'), (None, its exact form) for
    the record's meta. Whole floats and numpy/torch integers are integers."""
    if value is None:
        return None, None
    if isinstance(value, int):
        number: int | None = int(value)
    elif isinstance(value, (str, bytes)):
        number = None
    else:
        number = _whole(value)
    if number is not None and INT64_MIN <= number <= INT64_MAX:
        return number, None
    return None, _exact(value)


def _whole(value: Any) -> int | None:
    index = getattr(value, "__index__", None)
    if index is not None:
        try:
            return int(index())
        except (TypeError, ValueError, RuntimeError):
            pass
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(f) if f.is_integer() else None


def _exact(value: Any) -> Any:
    """A JSON-able exact form of a step or batch_idx that the int64 column cannot hold."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if module_of(value) in ("numpy", "torch") and hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


def storable_text(text: str) -> tuple[str, dict[str, Any] | None]:
    """`text` as UTF-8 can hold it. Lone surrogates (os.fsdecode's escapes for bytes that
    are not UTF-8) have no UTF-8 form: each is replaced by U+FFFD, and meta['surrogates']
    lists [position, code point] of each in the stored text, so the original is restored
    exactly by putting the code points back."""
    if text.isascii():
        return text, None
    found = [[m.start(), ord(m.group())] for m in SURROGATE.finditer(text)]
    if not found:
        return text, None
    return SURROGATE.sub("\ufffd", text), {"surrogates": found}


def text_fields(text: str, blobs: BlobStore, media_type: str) -> Captured:
    """A text inline, or in the blob store when long; lone surrogates made storable."""
    text, marks = storable_text(text)
    if len(text) <= INLINE_TEXT_LIMIT:
        return Captured(text=text, meta=marks)
    data = text.encode()
    return Captured(blob=blobs.put_bytes(data), meta={"media_type": media_type,
                                                      "size": len(data), **(marks or {})})


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist") and module_of(obj) in ("numpy", "torch"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def to_json(obj: Any, what: str) -> str:
    """JSON text of `obj` (numpy/torch values as lists, sets and tuples as lists, paths as
    strings). Characters are kept as they are, so that lone surrogates can be found and made
    storable by `storable_text`."""
    try:
        return json.dumps(obj, default=_json_default, allow_nan=True, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:  # ValueError: a self-reference
        raise TypeError(f"{what} cannot be logged as JSON: {e}") from None


def safe_repr(obj: Any) -> str:
    """`repr(obj)`; when that fails (a `__repr__` that raises, nesting deeper than the
    recursion limit), `object.__repr__`'s type and address: describing a value never fails."""
    try:
        return repr(obj)
    except Exception:  # noqa: BLE001 - whatever a user's __repr__ raises
        return object.__repr__(obj)


def _json_or_str(item: Any) -> tuple[str, dict[str, Any]]:
    """The JSON of `item`, or, when JSON cannot hold it (an object, a tuple key, a
    self-referencing list), the JSON of its `str()` (a container's is its repr: `[1, [...]]`)
    flagged in meta['stringified'] (the documented mapping; MLflow itself stringifies
    params)."""
    try:
        return to_json(item, "value"), {}
    except TypeError:
        pass
    try:
        text = str(item)
    except Exception:  # noqa: BLE001 - a __str__ that raises or recurses too deep
        text = safe_repr(item)
    return to_json(text, "value"), {"stringified": type(item).__name__}


def capture_param(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    """Params keep their JSON value (see `_json_or_str`). MLflow and TensorBoard store a
    param as its str(): when that is not the str() of the JSON value (a tuple, a numpy
    number, a Path...), meta['str'] keeps it, so an export can send what itwinai sent.
    Secrets are redacted first (see `redaction`)."""
    item = redact_param(name, item)
    text, meta = _json_or_str(item)
    if not meta:
        as_str = str(item)
        if as_str != str(json.loads(text)):
            meta["str"] = as_str
    text, marks = storable_text(text)
    meta = {**meta, **(marks or {})}
    return Captured(text=text, meta=meta or None)


def capture_text(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    if not isinstance(item, str):
        raise TypeError(f"kind='text' needs a str, got {type(item).__name__}")
    return text_fields(item, blobs, "text/plain")


def capture_dict(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    """`kind='dict'`: the JSON of `item` (MLflow's log_dict takes any JSON value, W&B any
    object); what JSON cannot hold (an object, a tuple key, a self-reference, something that
    is not a dict at all) as the JSON of its str(), flagged meta['stringified'] (see
    `_json_or_str`): the journal keeps it rather than fail the training step."""
    text, meta = _json_or_str(item)
    cap = text_fields(text, blobs, "application/json")
    return Captured(cap.value, cap.text, cap.blob, {**(cap.meta or {}), **meta} or None)


def capture_artifact(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    """A path is copied (a directory with its structure); any other object is pickled."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_file():
            sha, size = blobs.put_file(path)
            return Captured(blob=sha, meta={"type": "file", "file_name": path.name,
                                            "size": size})
        if path.is_dir():
            sha, count = blobs.put_tree(path)
            return Captured(blob=sha, meta={"type": "directory", "dir_name": path.name,
                                            "files": count})
        raise FileNotFoundError(f"artifact path {str(path)!r} does not exist")
    try:
        data = pickle.dumps(item)
    except Exception as e:  # noqa: BLE001 - pickling can raise anything
        raise TypeError(f"artifact of type {type(item).__name__} cannot be pickled: {e}") from e
    return Captured(blob=blobs.put_bytes(data), meta={"type": "pickle", "file_name": "object.pkl",
                                                      "class": _qualname(item)})


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"torch.save cannot serialise {type(obj).__name__}: {e}") from e
    return buf.getvalue()


def _qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def capture_torch(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    return Captured(blob=blobs.put_bytes(_torch_bytes(item)),
                    meta={"format": "torch.save", "class": _qualname(item),
                          "file_name": "object.pt"})


def capture_model(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(item, torch.nn.Module):
        raise TypeError(f"kind='model' needs a torch.nn.Module, got {type(item).__name__}")
    n_params = sum(p.numel() for p in item.parameters())
    return Captured(
        value=float(n_params),
        blob=blobs.put_bytes(_torch_bytes(item)),
        meta={"format": "torch.save", "class": _qualname(item), "parameters": n_params,
              "file_name": "model.pt"},
    )


def _png(image: Any) -> tuple[bytes, dict[str, Any]]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), {"media_type": "image/png", "width": image.width,
                            "height": image.height, "mode": image.mode}


def _array_to_pil(arr: Any, layout: str) -> Any:
    import numpy as np
    from PIL import Image

    if layout == "CHW":
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an image array must be HW, HWC or CHW (C in 1, 3, 4); got shape {arr.shape}"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise ValueError("a float image must have values in [0, 1]")
        arr = np.round(np.nan_to_num(arr) * 255).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"an integer image must have values in [0, 255], dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def numpy_image_layout(arr: Any, preferred: str) -> str:
    """How a 3-D numpy image is read: in the tracker's own layout (`preferred`: HWC for
    MLflow's log_image, CHW for TensorBoard's add_image), unless only the other one fits
    (1, 3 or 4 channels)."""
    if getattr(arr, "ndim", 0) != 3:
        return "HWC"  # HW: nothing to move
    fits = {"CHW": arr.shape[0] in (1, 3, 4), "HWC": arr.shape[-1] in (1, 3, 4)}
    if fits[preferred] or not any(fits.values()):
        return preferred
    return "HWC" if preferred == "CHW" else "CHW"


def capture_image(item: Any, blobs: BlobStore, name: str, options: Options,
                  numpy_layout: str = "HWC") -> Captured:
    """Lossless PNG from a PIL image, a numpy HW/HWC/CHW array (see `numpy_image_layout`) or
    a torch HW/CHW tensor. Floats must be in [0, 1] and are scaled to 0..255, as MLflow's
    log_image does."""
    mod = module_of(item)
    if mod == "PIL":
        image = item
    elif mod == "numpy":
        image = _array_to_pil(item, numpy_image_layout(item, numpy_layout))
    elif mod == "torch":
        t = item.detach().cpu()
        image = _array_to_pil(t.numpy(), "CHW" if t.ndim == 3 else "HW")
    else:
        raise TypeError(
            f"kind='image' needs a PIL image, a numpy array or a torch tensor, got "
            f"{type(item).__name__}"
        )
    data, meta = _png(image)
    return Captured(blob=blobs.put_bytes(data), meta=meta)


def capture_figure(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    mod = module_of(item)
    if mod == "matplotlib" and hasattr(item, "savefig"):
        buf = io.BytesIO()
        item.savefig(buf, format="png")
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as im:
            width, height = im.size
        return Captured(blob=blobs.put_bytes(buf.getvalue()),
                        meta={"media_type": "image/png", "figure": "matplotlib",
                              "width": width, "height": height})
    if mod == "plotly" and hasattr(item, "to_json"):
        return Captured(blob=blobs.put_bytes(item.to_json().encode()),
                        meta={"media_type": "application/vnd.plotly.v1+json",
                              "figure": "plotly"})
    raise TypeError(f"kind='figure' needs a matplotlib or plotly figure, got "
                    f"{type(item).__name__}")


def capture_dataset(item: Any, blobs: BlobStore, name: str, options: Options
                    ) -> Captured:
    """A dataset is described, never copied: an `mlflow.data.Dataset` by its own dict form
    (what MLflow's log_input sends; itwinai's MLFlowLogger ignores other datasets)."""
    if module_of(item) != "mlflow" or not hasattr(item, "to_dict"):
        raise TypeError(f"kind='dataset' needs an mlflow.data.Dataset, got "
                        f"{type(item).__name__}")
    desc = {**item.to_dict(), "source_type_class": _qualname(item)}
    return Captured(text=to_json(desc, "dataset description"), meta={"dataset": "mlflow"})


def capture_metric(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    return metric_fields(item, blobs)[1]



#: The signature of every capture function (see `kinds.CAPTURE`).
Capture = Callable[[Any, BlobStore, str, Options], Captured]
