"""Text and JSON as the journal stores them: inline when short, in the blob store when long,
lone surrogates made storable, and any value as JSON (or, when JSON cannot hold it, as the JSON
of its str(), flagged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.names import SURROGATE
from itwinai_journal.format.reprs import safe_repr

from .context import Captured
from .origin import module_of, qualname

#: Text longer than this goes to the blob store rather than into a JSONL line.
INLINE_TEXT_LIMIT = 64 * 1024


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


def json_or_str(item: Any) -> tuple[str, dict[str, Any]]:
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


def json_text_fields(item: Any, blobs: BlobStore, logged_as: str) -> Captured:
    """The fields of a `text` record holding `item`'s JSON (its str() when JSON cannot hold
    it), for an object logged as `logged_as` that the journal cannot keep as that kind."""
    text, meta = json_or_str(item)
    cap = text_fields(text, blobs, "application/json")
    meta = {**(cap.meta or {}), **meta, "logged_as": logged_as, "type": qualname(item)}
    return Captured(cap.value, cap.text, cap.blob, meta)
