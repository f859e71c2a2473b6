"""Names and values as yprov4ml can take them: identifiers and file names it would break on
are mapped deterministically (the exporter reports the mapping), CSV fields quoted."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[:/\\\x00-\x1f]")
_CSV_SPECIAL = re.compile(r'[,"\r\n]')


def prov_name(name: str, limit: int) -> str:
    """`name` as yprov4ml can take it, in an identifier and in a file name: ':' would make a
    PROV qualified name with an unknown prefix, '/' and '\\' a path; names longer than `limit`
    bytes are cut and given a digest of the full name."""
    safe = _UNSAFE.sub("_", name)
    if not safe.strip("."):
        safe = safe.replace(".", "_") or "_"
    if len(safe.encode()) > limit:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        safe = safe.encode()[:limit - 11].decode(errors="ignore") + "~" + digest
    return safe


def csv_field(text: str) -> str:
    """`text` as one field of a CSV line: quoted when it holds the separator, a quote or a
    line break (yprov4ml writes its metric files with f-strings, unquoted)."""
    if not _CSV_SPECIAL.search(text):
        return text
    return '"' + text.replace('"', '""') + '"'
