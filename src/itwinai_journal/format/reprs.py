"""How a value the journal cannot hold as JSON is described: its repr, which never fails.

In the format package because the manifest (run facts of any type a user passes) needs it,
and the format package imports nothing else of the project; capture uses it from here.
"""

from __future__ import annotations

from typing import Any


def safe_repr(obj: Any) -> str:
    """`repr(obj)`; when that fails (a `__repr__` that raises, nesting deeper than the
    recursion limit), `object.__repr__`'s type and address: describing a value never fails."""
    try:
        return repr(obj)
    except Exception:  # noqa: BLE001 - whatever a user's __repr__ raises
        return object.__repr__(obj)
