"""The on-disk record format (version 1), in one place so writer, reader and verifier agree."""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1

#: Range of the int64 `seq`, `step` and `batch_idx` columns.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

#: Column order of a journal record, as in the JSONL lines and the sealed Parquet files.
COLUMNS = ("seq", "time", "kind", "name", "step", "batch_idx", "value", "text", "blob", "meta")

ARROW_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("time", pa.float64()),
        ("kind", pa.string()),
        ("name", pa.string()),
        ("step", pa.int64()),
        ("batch_idx", pa.int64()),
        ("value", pa.float64()),
        ("text", pa.string()),
        ("blob", pa.string()),
        ("meta", pa.string()),
    ]
)

#: Every kind of the itwinai logger API. A logger ignores other kinds (one warning per kind),
#: as itwinai's loggers do.
ALL_KINDS = (
    "metric", "torch", "artifact", "figure", "image", "param", "text", "dict", "model",
    "best_model", "dataset", "watch", "flops_pb", "flops_pe", "system", "carbon",
    "execution_time", "prov_documents",
)

#: Kinds written by `watch` hooks rather than by a user's `log()` call.
HISTOGRAM_KIND = "histogram"
TOPOLOGY_KIND = "topology"
#: Kind of the background system-metrics samples (capture/sampler.py): one record per sample.
SYSTEM_METRIC_KIND = "system_metric"
