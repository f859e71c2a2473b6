"""Which function captures each kind of the logger API (`log(item, name, kind=...)`): the one
table that names every capture module."""

from __future__ import annotations

from . import energy, flops, media, objects, system, timing, values, watch
from .context import Capture

CAPTURE: dict[str, Capture] = {
    "metric": values.capture_metric,
    "param": values.capture_param,
    "text": values.capture_text,
    "dict": values.capture_dict,
    "artifact": objects.capture_artifact,
    "torch": objects.capture_torch,
    "model": objects.capture_model,
    "best_model": objects.capture_model,
    "dataset": objects.capture_dataset,
    "figure": media.capture_figure,
    "image": media.capture_image,
    # Torch hooks writing gradient/parameter histograms (torch imported when a module is
    # watched).
    "watch": watch.capture_watch,
    # Prov4ML's measured kinds: measured at log() time on the compute node.
    "flops_pb": flops.capture_flops_pb,
    "flops_pe": flops.capture_flops_pe,
    "system": system.capture_system,
    "carbon": energy.capture_carbon,
    "execution_time": timing.capture_execution_time,
    "prov_documents": timing.capture_prov_documents,
}
