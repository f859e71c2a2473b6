"""Optional libraries of the measured kinds (psutil, pynvml, codecarbon, fvcore), imported when
first needed: `import itwinai_journal.loggers` stays light, and a compute node without them
still measures what it can."""

from __future__ import annotations

import importlib
import sys
from typing import Any

_missing: set[str] = set()


def optional(name: str) -> Any:
    """An optional library if importable, else None. A failed import is remembered so that
    `log()` does not search the path at every call."""
    module = sys.modules.get(name)
    if module is not None or name in _missing:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing.add(name)
        return None
