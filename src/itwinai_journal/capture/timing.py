"""`execution_time` and `prov_documents`: where in the run a call stands.

- `execution_time`: value: the time of the call in Unix seconds (`time.time()`, as
  yprov4ml's `log_current_execution_time`), or the number given; meta `method` ("time.time" |
  "given"), `session_start` (when the journal session started).
- `prov_documents`: a marker asking the exporter to produce the documents at this point: value
  None, meta `{"marker": true}`.
"""

from __future__ import annotations

import time
from typing import Any

from .context import CaptureContext, Captured, Options
from .numbers import given_number, non_negative
from .session import measurements


def capture_execution_time(item: Any, ctx: CaptureContext, name: str,
                           options: Options) -> Captured:
    """`kind='execution_time'`: the current time in Unix seconds, as yprov4ml's
    `log_current_execution_time` records it (`time.time()`), with the session's start in meta
    so that the time elapsed can be read too; or the number given (seconds)."""
    given = given_number(item)
    if given is not None:
        return Captured(non_negative(given, "kind='execution_time' item"),
                        meta={"method": "given"})
    session = measurements(ctx)
    return Captured(time.time(), meta={"method": "time.time",
                                       "session_start": session.start_wall,
                                       "clock": session.clock})


def capture_prov_documents(item: Any, ctx: CaptureContext, name: str,
                           options: Options) -> Captured:
    """`kind='prov_documents'`: where the exporter produces the provenance documents."""
    return Captured(meta={"marker": True})
