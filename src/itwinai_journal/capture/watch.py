"""`kind='watch'`: what `wandb.watch` does, without wandb, into the journal.

`WandBLogger.log(model, "model", kind="watch", log="gradients", log_freq=1000)` records the
module's topology once (the watch call's own record, kind "watch", JSON in `text`) and registers
torch hooks that, every `log_freq` forward calls of the module, append one record of kind
"histogram" per parameter: `parameters/<name>` (values seen by that forward call) and/or
`gradients/<name>` (the gradient accumulated by the backward pass that follows it). Histograms
are computed on the compute node (64 bins, as wandb.watch), so the journal holds what was
measured and the export needs no torch.

Hook records go through the same writer queue as the logger's own records, routed to W&B only
(the only logger that accepts `watch`), with step and batch_idx None and meta
`{"source": "watch", "call": n}`: `n` is the forward call they belong to.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .context import CaptureContext, Captured, Options
from .text import text_fields

#: Number of histogram bins, as wandb.watch.
NUM_BINS = 64
#: Values of `log` that wandb.watch accepts.
LOG_CHOICES = ("gradients", "parameters", "all", None)
#: Keyword arguments of wandb.watch (besides `models`); the ones without effect offline are
#: accepted so that code written for wandb runs unchanged.
WATCH_KWARGS = ("criterion", "log", "log_freq", "idx", "log_graph")
#: Records of a watch go to this destination only (WandBLogger is the only logger with 'watch').
ROUTE = "wandb"

Append = Callable[[tuple], None]


def histogram(tensor: Any) -> dict[str, Any]:
    """64-bin histogram and moments of a tensor's finite values, as JSON-ready numbers.

    Computed with `torch.histc` on the detached CPU tensor (float32, or float64 when the tensor
    is float64). NaN and +-inf cannot be binned: they are counted in `nonfinite` and left out
    of everything else; with no finite value, `bins` and `counts` are None."""
    import torch

    flat = tensor.detach().reshape(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    flat = flat.to(device="cpu", dtype=dtype)
    finite = torch.isfinite(flat)
    nonfinite = int(flat.numel() - int(finite.sum()))
    if nonfinite:
        flat = flat[finite]
    num = int(flat.numel())
    if num == 0:
        return {"bins": None, "counts": None, "min": None, "max": None, "num": 0, "sum": 0.0,
                "sum_squares": 0.0, "nonfinite": nonfinite}
    lo, hi = float(flat.min()), float(flat.max())
    if lo == hi:  # one value: centre a unit-wide range on it so that the edges are distinct
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(flat, bins=NUM_BINS, min=lo, max=hi)
    edges = torch.linspace(lo, hi, NUM_BINS + 1, dtype=torch.float64)
    wide = flat.to(torch.float64)
    out = {
        "bins": edges.tolist(),
        "counts": [int(c) for c in counts.tolist()],
        "min": float(wide.min()),
        "max": float(wide.max()),
        "num": num,
        "sum": float(wide.sum()),
        "sum_squares": float((wide * wide).sum()),
    }
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def topology(module: Any, name: str) -> dict[str, Any]:
    """The module tree: every submodule with its class and own parameters' shapes and sizes."""
    modules = []
    for mod_name, mod in module.named_modules():
        params = {p_name: list(p.shape) for p_name, p in mod.named_parameters(recurse=False)}
        modules.append({
            "name": mod_name,
            "class": type(mod).__name__,
            "parameters": params,
            "num_parameters": sum(math.prod(s) for s in params.values()),
        })
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"name": name, "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "num_parameters": total, "trainable_parameters": trainable, "modules": modules}


class WatchHandle:
    """The hooks of one watched module. Records stop (and the hooks remove themselves) once
    `alive()` turns false, i.e. when the journal writer is closed: a model that outlives its
    logger must not keep filling a queue nobody drains."""

    def __init__(self, module: Any, append: Append, route: str | None, log: str | None,
                 log_freq: int, alive: Callable[[], bool]):
        self.append = append
        self.route = route
        self.log_params = log in ("parameters", "all")
        self.log_grads = log in ("gradients", "all")
        self.log_freq = log_freq
        self.alive = alive
        self.calls = 0
        #: Forward call whose backward pass records gradients (None: not a logging call).
        self.armed: int | None = None
        self._grads_done: dict[str, int] = {}
        self._lock = threading.Lock()
        self.handles: list[Any] = []
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if log is None:
            return
        self.handles.append(module.register_forward_hook(self._on_forward))
        if self.log_grads:
            for p_name, param in self.params:
                self.handles.append(self._grad_hook(p_name, param))

    def _grad_hook(self, p_name: str, param: Any) -> Any:
        """Hook on the accumulated gradient (after backward wrote `param.grad`), falling back
        to a hook on the gradient tensor for torch versions without it."""
        if hasattr(param, "register_post_accumulate_grad_hook"):
            return param.register_post_accumulate_grad_hook(
                lambda p: self._on_grad(p_name, p.grad))
        return param.register_hook(lambda g: self._on_grad(p_name, g))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _emit(self, name: str, tensor: Any, call: int) -> None:
        text = json.dumps(histogram(tensor))
        self.append((time.time(), "histogram", name, None, None, None, text, None,
                     {"source": "watch", "call": call}, self.route))

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        if not self.alive():
            self.remove()
            return
        with self._lock:
            self.calls += 1
            call = self.calls
            self.armed = call if call % self.log_freq == 0 else None
        if self.armed is None or not self.log_params:
            return
        for p_name, param in self.params:
            self._emit(f"parameters/{p_name}", param, call)

    def _on_grad(self, p_name: str, grad: Any) -> None:
        call = self.armed
        if call is None or grad is None or self._grads_done.get(p_name) == call:
            return
        if not self.alive():
            self.remove()
            return
        self._grads_done[p_name] = call
        self._emit(f"gradients/{p_name}", grad, call)


@contextmanager
def paused(model: Any) -> Iterator[None]:
    """The hooks of `model` and its submodules count forward calls and record parameter histograms
    every `log_freq` calls: a FLOP-counting pass must neither count nor record."""
    handles = {id(h): h for m in model.modules()
               if (h := getattr(m, "_itwinai_watch", None)) is not None}.values()
    saved = [(h, h.calls, h.armed, h.log_params) for h in handles]
    for handle in handles:
        handle.log_params = False
    try:
        yield
    finally:
        for handle, calls, armed, log_params in saved:
            handle.calls, handle.armed, handle.log_params = calls, armed, log_params


def attach(module: Any, append: Append, route: str | None = ROUTE, *,
           log: str | None = "gradients", log_freq: int = 1000,
           alive: Callable[[], bool] = lambda: True) -> WatchHandle:
    """Hook `module` so that its histograms are appended (as writer queue tuples) through
    `append`. Watching a module again replaces its previous hooks, as wandb.watch does."""
    if log not in LOG_CHOICES:
        raise ValueError(f"log must be one of {LOG_CHOICES}, got {log!r}")
    if type(log_freq) is not int or log_freq < 1:
        raise ValueError(f"log_freq must be an int >= 1, got {log_freq!r}")
    previous = getattr(module, "_itwinai_watch", None)
    if previous is not None:
        previous.remove()
    handle = WatchHandle(module, append, route, log, log_freq, alive)
    module._itwinai_watch = handle
    return handle


def capture_watch(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    """The `log(kind='watch')` capture: hooks the module and returns its topology record."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(item, torch.nn.Module):
        raise TypeError(f"kind='watch' needs a torch.nn.Module, got {type(item).__name__}")
    unknown = sorted(set(options) - set(WATCH_KWARGS) - {"context"})
    if unknown:
        raise TypeError(f"kind='watch' got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(WATCH_KWARGS)}")
    log = options.get("log", "gradients")
    log_freq = options.get("log_freq", 1000)
    attach(item, ctx.append, ROUTE, log=log, log_freq=log_freq, alive=ctx.is_open)
    cap = text_fields(json.dumps(topology(item, name)), ctx.blobs, "application/json")
    meta = {**(cap.meta or {}), "source": "watch", "log": log, "log_freq": log_freq,
            "log_graph": bool(options.get("log_graph", True))}
    return Captured(cap.value, cap.text, cap.blob, meta)
