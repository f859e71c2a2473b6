"""Turning a logged object into journal fields, at `log()` time, one function per kind.

Every function returns `Captured(value, text, blob, meta)`. Libraries (torch, numpy, PIL,
matplotlib, plotly, pandas) are imported only when an object of theirs arrives, and no tracker
library is ever imported: the exporters decide later how each kind is shown in each tracker.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from . import measure
from .blobs import BlobStore
from .redaction import redact_param

#: Text longer than this goes to the blob store rather than into a JSONL line.
INLINE_TEXT_LIMIT = 64 * 1024


#: Keyword arguments the user passed to `log()` beyond the standard ones.
Options = dict[str, Any]


class Captured(NamedTuple):
    value: float | None = None
    text: str | None = None
    blob: str | None = None
    meta: dict[str, Any] | None = None


def _module_of(obj: Any) -> str:
    return type(obj).__module__.split(".", 1)[0]


def metric_value(item: Any) -> float:
    """A metric as float64: Python/numpy numbers and 0-d (one-element) torch tensors."""
    if isinstance(item, bool):
        return float(item)
    if isinstance(item, (int, float)):
        return float(item)
    mod = _module_of(item)
    if mod == "numpy":
        import numpy as np

        if isinstance(item, np.generic) and np.issubdtype(item.dtype, np.number) or (
            isinstance(item, np.ndarray) and item.ndim == 0
            and np.issubdtype(item.dtype, np.number)
        ):
            return float(item)
    elif mod == "torch":
        import torch

        if isinstance(item, torch.Tensor) and item.numel() == 1 and item.ndim == 0:
            if item.is_complex():
                raise TypeError("a metric must be a real number, got a complex tensor")
            return float(item.detach().cpu().item())
        if isinstance(item, torch.Tensor):
            raise TypeError(
                f"a metric must be a number or a 0-d tensor, got a tensor of shape "
                f"{tuple(item.shape)}; reduce it first (e.g. loss.mean())"
            )
    raise TypeError(
        f"a metric must be a number (int, float, numpy scalar or 0-d torch tensor), "
        f"got {type(item).__name__}"
    )


def check_index(value: Any, what: str) -> int | None:
    """`step` and `batch_idx`: None or an integer (numpy/torch integer scalars accepted)."""
    if value is None or type(value) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int or None, got bool")
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "__index__"):
        return int(value.__index__())
    raise TypeError(f"{what} must be an int or None, got {type(value).__name__}")


def _text_fields(text: str, blobs: BlobStore, media_type: str) -> Captured:
    if len(text) <= INLINE_TEXT_LIMIT:
        return Captured(text=text)
    data = text.encode()
    return Captured(blob=blobs.put_bytes(data), meta={"media_type": media_type,
                                                      "size": len(data)})


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist") and _module_of(obj) in ("numpy", "torch"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} cannot be logged as JSON: {e}") from None


def capture_param(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    """Params keep their JSON value; a value JSON cannot hold is logged as its `str()`
    (documented mapping, as MLflow itself stringifies params) and flagged in meta. Secrets are
    redacted first (see `redaction`)."""
    item = redact_param(name, item)
    try:
        return Captured(text=json.dumps(item, default=_json_default, allow_nan=True))
    except (TypeError, ValueError):
        return Captured(text=json.dumps(str(item)), meta={"stringified": type(item).__name__})


def capture_text(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    if not isinstance(item, str):
        raise TypeError(f"kind='text' needs a str, got {type(item).__name__}")
    return _text_fields(item, blobs, "text/plain")


def capture_dict(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    if not isinstance(item, dict):
        raise TypeError(f"kind='dict' needs a dict, got {type(item).__name__}")
    return _text_fields(to_json(item, "dict"), blobs, "application/json")


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
            f"an image array must be HW, HWC (C in 1, 3, 4) or, for torch, CHW; got shape "
            f"{arr.shape}"
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


def capture_image(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    """Lossless PNG from a PIL image, a numpy HW/HWC array or a torch CHW tensor. Floats must be
    in [0, 1] and are scaled to 0..255, as MLflow's log_image does."""
    mod = _module_of(item)
    if mod == "PIL":
        image = item
    elif mod == "numpy":
        image = _array_to_pil(item, "HWC")
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
    mod = _module_of(item)
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


def _frame_description(df: Any, name: str) -> dict[str, Any]:
    import pandas as pd

    digest = hashlib.sha256(pd.util.hash_pandas_object(df, index=True).values.tobytes())
    return {
        "name": name,
        "digest": digest.hexdigest()[:16],
        "source_type": "pandas",
        "schema": {str(c): str(t) for c, t in df.dtypes.items()},
        "shape": list(df.shape),
    }


def _array_description(arr: Any, name: str) -> dict[str, Any]:
    import numpy as np

    arr = np.ascontiguousarray(arr)
    return {
        "name": name,
        "digest": hashlib.sha256(arr.tobytes()).hexdigest()[:16],
        "source_type": "numpy",
        "schema": {"dtype": str(arr.dtype)},
        "shape": list(arr.shape),
    }


def capture_dataset(item: Any, blobs: BlobStore, name: str, options: Options
                    ) -> Captured:
    """A dataset is described, never copied: an `mlflow.data.Dataset` by its own dict form,
    pandas and numpy data by name, digest, schema and shape."""
    mod = _module_of(item)
    if mod == "mlflow" and hasattr(item, "to_dict"):
        desc = {**item.to_dict(), "source_type_class": _qualname(item)}
        kind = "mlflow"
    elif mod == "pandas":
        desc, kind = _frame_description(item, name), "pandas"
    elif mod == "numpy":
        desc, kind = _array_description(item, name), "numpy"
    elif isinstance(item, dict) and {"name", "digest"} <= item.keys():
        desc, kind = dict(item), "dict"
    else:
        raise TypeError(
            f"kind='dataset' needs an mlflow.data.Dataset, a pandas DataFrame, a numpy array "
            f"or a dict with 'name' and 'digest', got {type(item).__name__}"
        )
    return Captured(text=to_json(desc, "dataset description"), meta={"dataset": kind})


def capture_metric(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
    return Captured(value=metric_value(item))


def not_yet(feature: str) -> Callable[..., Captured]:
    def capture(item: Any, blobs: BlobStore, name: str, options: Options) -> Captured:
        raise NotImplementedError(f"{feature} is not implemented yet in itwinai-journal")

    return capture


CAPTURE: dict[str, Callable[..., Captured]] = {
    "metric": capture_metric,
    "param": capture_param,
    "text": capture_text,
    "dict": capture_dict,
    "artifact": capture_artifact,
    "torch": capture_torch,
    "figure": capture_figure,
    "image": capture_image,
    "model": capture_model,
    "best_model": capture_model,
    "dataset": capture_dataset,
    # Torch hooks writing gradient/parameter histograms; see watch.py (imported by name:
    # watch.py imports this module lazily, and torch only when a module is watched).
    "watch": __import__("watch", globals(), None, ("capture_watch",), 1).capture_watch,
    # Prov4ML's measured kinds: measured at log() time on the compute node; see measure.py.
    "flops_pb": measure.capture_flops_pb,
    "flops_pe": measure.capture_flops_pe,
    "system": measure.capture_system,
    "carbon": measure.capture_carbon,
    "execution_time": measure.capture_execution_time,
    "prov_documents": measure.capture_prov_documents,
}
