"""What a capture function receives besides the logged object, and what it returns.

A capture function turns one logged object into the fields of one journal record:
`capture(item, ctx, name, options) -> Captured`. `ctx` is everything of the journal session it
may use, handed in by the logger that owns the session, so that no capture code looks its
writer up again: the blob store for payloads, the record queue for records made later (the
`watch` hooks), whether the session is still open, and when it started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from itwinai_journal.format.blobs import BlobStore

#: Keyword arguments the user passed to `log()` beyond the standard ones.
Options = dict[str, Any]


class Captured(NamedTuple):
    """The fields of one record, as the writer's queue takes them."""

    value: float | None = None
    text: str | None = None
    blob: str | None = None
    meta: dict[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class CaptureContext:
    """The journal session a capture writes into (one per logger and open journal).

    Attributes:
        blobs: the session's content-addressed store for payloads; one per session, so it
            also keys the session's measurement state (see `session.measurements`).
        append: the session's record queue (`deque.append`: atomic, lock-free), for records
            made after the `log()` call returned (`watch` hooks).
        is_open: whether the session still takes records (hooks stop once it is closed).
        session_start: when the session started (Unix seconds, from the manifest), or None
            when unknown (a capture called outside a logger).
    """

    blobs: BlobStore
    append: Callable[[tuple], None] = lambda record: None
    is_open: Callable[[], bool] = lambda: True
    session_start: float | None = None

    @classmethod
    def of_writer(cls, writer: Any) -> CaptureContext:
        """The context of `writer`'s session (a `RankWriter`)."""
        sessions = writer.manifest.get("sessions") or []
        start = sessions[-1].get("start") if sessions else None
        return cls(writer.blobs, writer.append, lambda: not writer.closed,
                   float(start) if isinstance(start, (int, float)) else None)


#: The signature of every capture function (see `kinds.CAPTURE`).
Capture = Callable[[Any, CaptureContext, str, Options], Captured]

#: Measured numbers by field name, and what the meta of a measured record says about them.
Fields = dict[str, float]
Meta = dict[str, Any]
