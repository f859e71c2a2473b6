"""Images and figures, kept as lossless PNG (or plotly's JSON) in the blob store."""

from __future__ import annotations

import io
from typing import Any

from .context import CaptureContext, Captured, Options
from .origin import module_of


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


def capture_image(item: Any, ctx: CaptureContext, name: str, options: Options,
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
    return Captured(blob=ctx.blobs.put_bytes(data), meta=meta)


def capture_figure(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    mod = module_of(item)
    if mod == "matplotlib" and hasattr(item, "savefig"):
        buf = io.BytesIO()
        item.savefig(buf, format="png")
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as im:
            width, height = im.size
        return Captured(blob=ctx.blobs.put_bytes(buf.getvalue()),
                        meta={"media_type": "image/png", "figure": "matplotlib",
                              "width": width, "height": height})
    if mod == "plotly" and hasattr(item, "to_json"):
        return Captured(blob=ctx.blobs.put_bytes(item.to_json().encode()),
                        meta={"media_type": "application/vnd.plotly.v1+json",
                              "figure": "plotly"})
    raise TypeError(f"kind='figure' needs a matplotlib or plotly figure, got "
                    f"{type(item).__name__}")
