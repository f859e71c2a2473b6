"""Where a logged object comes from (its library, its class), found without importing
anything: captures and loggers dispatch on it, and libraries are imported only when an object
of theirs arrives."""

from __future__ import annotations

import sys
from typing import Any


def module_of(obj: Any) -> str:
    """The top-level package of `obj`'s type ('numpy', 'torch', 'PIL'...), without importing
    it."""
    return type(obj).__module__.split(".", 1)[0]


def qualname(obj: Any) -> str:
    """The full name of `obj`'s class, kept in meta so that an export can say what was logged."""
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def is_torch_module(obj: Any) -> bool:
    """Whether `obj` is a `torch.nn.Module` (torch is not imported for it: a module implies
    torch was imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
