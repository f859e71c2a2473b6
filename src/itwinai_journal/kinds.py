"""Which function captures each kind of the logger API (`log(item, name, kind=...)`).

A module of its own because the captures live in three: the plain kinds in capture.py, the
Prov4ML kinds measured at `log()` time in measure.py, and `watch`'s torch hooks in watch.py;
the last two build on capture.py, so the table that names all of them cannot live there.
"""

from __future__ import annotations

from . import capture, measure, watch

CAPTURE: dict[str, capture.Capture] = {
    "metric": capture.capture_metric,
    "param": capture.capture_param,
    "text": capture.capture_text,
    "dict": capture.capture_dict,
    "artifact": capture.capture_artifact,
    "torch": capture.capture_torch,
    "figure": capture.capture_figure,
    "image": capture.capture_image,
    "model": capture.capture_model,
    "best_model": capture.capture_model,
    "dataset": capture.capture_dataset,
    # Torch hooks writing gradient/parameter histograms (torch imported when a module is
    # watched).
    "watch": watch.capture_watch,
    # Prov4ML's measured kinds: measured at log() time on the compute node.
    "flops_pb": measure.capture_flops_pb,
    "flops_pe": measure.capture_flops_pe,
    "system": measure.capture_system,
    "carbon": measure.capture_carbon,
    "execution_time": measure.capture_execution_time,
    "prov_documents": measure.capture_prov_documents,
}
