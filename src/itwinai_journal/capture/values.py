"""The plain kinds: `metric`, `param`, `text` and `dict`, captured as numbers and text."""

from __future__ import annotations

import json
from typing import Any

from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.redaction import redact_param

from .context import CaptureContext, Captured, Options
from .numbers import NotAPlainMetric, is_complex, metric_value, one_element
from .text import json_or_str, json_text_fields, storable_text, text_fields


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
    number = one_element(item)
    if is_complex(number):
        return ("metric", Captured(value=float(number.real), meta={"imag": float(number.imag)}),
                "is a complex number: its real part is the value, meta['imag'] keeps the "
                "imaginary part")
    return ("text", json_text_fields(item, blobs, "metric"),
            f"is not a number ({type(item).__name__}): journaled as a text record of its JSON "
            "(meta['logged_as'] = 'metric'), which W&B and Prov4ML show as the value, "
            "TensorBoard as text and MLflow as a text artifact")


def capture_metric(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    return metric_fields(item, ctx.blobs)[1]


def capture_param(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    """Params keep their JSON value (see `json_or_str`). MLflow and TensorBoard store a
    param as its str(): when that is not the str() of the JSON value (a tuple, a numpy
    number, a Path...), meta['str'] keeps it, so an export can send what itwinai sent.
    Secrets are redacted first (see `redaction`)."""
    item = redact_param(name, item)
    text, meta = json_or_str(item)
    if not meta:
        as_str = str(item)
        if as_str != str(json.loads(text)):
            meta["str"] = as_str
    text, marks = storable_text(text)
    meta = {**meta, **(marks or {})}
    return Captured(text=text, meta=meta or None)


def capture_text(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    if not isinstance(item, str):
        raise TypeError(f"kind='text' needs a str, got {type(item).__name__}")
    return text_fields(item, ctx.blobs, "text/plain")


def capture_dict(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    """`kind='dict'`: the JSON of `item` (MLflow's log_dict takes any JSON value, W&B any
    object); what JSON cannot hold (an object, a tuple key, a self-reference, something that
    is not a dict at all) as the JSON of its str(), flagged meta['stringified'] (see
    `json_or_str`): the journal keeps it rather than fail the training step."""
    text, meta = json_or_str(item)
    cap = text_fields(text, ctx.blobs, "application/json")
    return Captured(cap.value, cap.text, cap.blob, {**(cap.meta or {}), **meta} or None)
