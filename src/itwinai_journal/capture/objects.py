"""Objects kept whole in the blob store: `artifact` (a file, a directory, or any picklable
object), `torch` and `model` (torch.save), and `dataset` (described, never copied)."""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from .context import CaptureContext, Captured, Options
from .origin import module_of, qualname
from .text import to_json


def capture_artifact(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    """A path is copied (a directory with its structure); any other object is pickled."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_file():
            sha, size = ctx.blobs.put_file(path)
            return Captured(blob=sha, meta={"type": "file", "file_name": path.name,
                                            "size": size})
        if path.is_dir():
            sha, count = ctx.blobs.put_tree(path)
            return Captured(blob=sha, meta={"type": "directory", "dir_name": path.name,
                                            "files": count})
        raise FileNotFoundError(f"artifact path {str(path)!r} does not exist")
    try:
        data = pickle.dumps(item)
    except Exception as e:  # noqa: BLE001 - pickling can raise anything
        raise TypeError(f"artifact of type {type(item).__name__} cannot be pickled: {e}") from e
    return Captured(blob=ctx.blobs.put_bytes(data),
                    meta={"type": "pickle", "file_name": "object.pkl", "class": qualname(item)})


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
    except Exception as e:  # noqa: BLE001
        raise TypeError(f"torch.save cannot serialise {type(obj).__name__}: {e}") from e
    return buf.getvalue()


def capture_torch(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    return Captured(blob=ctx.blobs.put_bytes(_torch_bytes(item)),
                    meta={"format": "torch.save", "class": qualname(item),
                          "file_name": "object.pt"})


def capture_model(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(item, torch.nn.Module):
        raise TypeError(f"kind='model' needs a torch.nn.Module, got {type(item).__name__}")
    n_params = sum(p.numel() for p in item.parameters())
    return Captured(
        value=float(n_params),
        blob=ctx.blobs.put_bytes(_torch_bytes(item)),
        meta={"format": "torch.save", "class": qualname(item), "parameters": n_params,
              "file_name": "model.pt"},
    )


def capture_dataset(item: Any, ctx: CaptureContext, name: str, options: Options
                    ) -> Captured:
    """A dataset is described, never copied: an `mlflow.data.Dataset` by its own dict form
    (what MLflow's log_input sends; itwinai's MLFlowLogger ignores other datasets)."""
    if module_of(item) != "mlflow" or not hasattr(item, "to_dict"):
        raise TypeError(f"kind='dataset' needs an mlflow.data.Dataset, got "
                        f"{type(item).__name__}")
    desc = {**item.to_dict(), "source_type_class": qualname(item)}
    return Captured(text=to_json(desc, "dataset description"), meta={"dataset": "mlflow"})
