"""`flops_pb` and `flops_pe`: FLOPs of forward passes, counted at `log()` time.

(`context` and any other `log()` kwargs are added to meta by the logger.)

`flops_pb`, item `(model, batch)`: FLOPs of one forward pass of `model` on `batch`.
`flops_pe`, item `(model, data)`: FLOPs of forward passes over every batch of `data`, a
DataLoader (iterated as is), a torch Dataset or Tensor (wrapped in
`DataLoader(data, batch_size=batch_size, shuffle=False)`, `batch_size=` kwarg, default 64:
FLOPs are per-sample additive for nearly every layer, and a bigger batch is faster to count)
or any other iterable of batches; `max_batches=` kwarg counts the first n batches only (the
value is then the sum over those, not an extrapolation). yprov4ml counts one sample of a
Dataset and multiplies by its length (and cannot take a DataLoader): the same number for a
model whose FLOPs are per-sample additive. A plain number item is stored as given.
value: FLOPs of this call, in fvcore's convention (one FLOP per multiply-add), as yprov4ml
counts them; meta: `method` ("fvcore.nn.FlopCountAnalysis" | "FlopCounterMode/2" | both
joined by "+" | "given", see `FlopCounter`), `fvcore_unused` (why fvcore did not count,
when it did not), `batches`, `samples` (when every batch has a leading dimension),
`batches_in_epoch` (when the loader has a length), `dataloader_batch_size` (when a Dataset
was wrapped). yprov4ml logs the running sum of a kind's counts over the run; the exporter
makes it from the journal's per-call values.
Counting runs under `torch.no_grad()` with the model in its current mode (train-only
branches such as auxiliary heads are what training executes), forward only (a training step
is roughly 3x). It leaves no trace: buffers (BatchNorm statistics) are restored, the
torch/random/numpy RNGs are forked, `watch` hooks neither count the call nor record
histograms. A batch is fed as `model(batch)` for a tensor, `model(batch[0])` for a
tuple/list (`(inputs, targets)`, as Prov4ML reads it) and `model(**batch)` for a mapping,
moved to the model's device.
"""

from __future__ import annotations

import itertools
import random
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

from . import libraries, watch
from .context import CaptureContext, Captured, Meta, Options
from .numbers import given_number, non_negative

#: Batch size used when `flops_pe` is given a Dataset rather than its DataLoader.
DEFAULT_DATASET_BATCH_SIZE = 64

#: How FLOPs are counted: fvcore's convention, one FLOP per multiply-add (what yprov4ml, and
#: so itwinai's Prov4MLLogger, records), by fvcore itself when it is importable, else by
#: torch's FlopCounterMode (two per multiply-add) halved.
FVCORE = "fvcore.nn.FlopCountAnalysis"
HALVED = "FlopCounterMode/2"


class FlopCount(NamedTuple):
    flops: int
    batches: int
    samples: int | None
    method: str
    fallback: str | None = None  # why fvcore was not used, when it was not


def _positive_int(options: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    return value


def capture_flops_pb(item: Any, ctx: CaptureContext, name: str, options: Options
                     ) -> Captured:
    """`kind='flops_pb'`: FLOPs of one forward pass on one batch (see the module docstring)."""
    return _capture_flops("flops_pb", item, options)


def capture_flops_pe(item: Any, ctx: CaptureContext, name: str, options: Options
                     ) -> Captured:
    """`kind='flops_pe'`: FLOPs of forward passes over a whole dataset (module docstring)."""
    return _capture_flops("flops_pe", item, options)


def _capture_flops(kind: str, item: Any, options: Options) -> Captured:
    given = given_number(item)
    if given is not None:
        return Captured(non_negative(given, f"kind={kind!r} item"), meta={"method": "given"})
    model, data = _model_and_data(item, kind)
    if kind == "flops_pb":
        count, meta = count_flops(model, [data]), {}
    else:
        count, meta = _epoch_flops(model, data, options)
    meta = {"method": count.method, "batches": count.batches, **meta}
    if count.samples is not None:
        meta["samples"] = count.samples
    if count.fallback:
        meta["fvcore_unused"] = count.fallback
    return Captured(float(count.flops), meta=meta)


def _model_and_data(item: Any, kind: str) -> tuple[Any, Any]:
    torch = sys.modules.get("torch")
    what = "batch" if kind == "flops_pb" else "dataset or DataLoader"
    if (torch is None or not isinstance(item, (tuple, list)) or len(item) != 2
            or not isinstance(item[0], torch.nn.Module)):
        raise TypeError(f"kind={kind!r} needs (model, {what}) with a torch.nn.Module, or a "
                        f"number of FLOPs, got {type(item).__name__}")
    return item[0], item[1]


def _epoch_flops(model: Any, data: Any, options: Mapping[str, Any]) -> tuple[FlopCount, Meta]:
    max_batches = _positive_int(options, "max_batches", None)
    batches, meta = epoch_batches(data, options)
    count = count_flops(model, batches, max_batches)
    return count, meta


def epoch_batches(data: Any, options: Mapping[str, Any]) -> tuple[Iterable[Any], Meta]:
    """The batches of one epoch over `data` and what is known about them. A Dataset or a
    Tensor of samples has no batches of its own: it is wrapped in a DataLoader."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    meta: Meta = {}
    if isinstance(data, DataLoader):
        loader: Iterable[Any] = data
    elif isinstance(data, (Dataset, torch.Tensor)):
        batch_size = _positive_int(options, "batch_size", DEFAULT_DATASET_BATCH_SIZE)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        meta["dataloader_batch_size"] = batch_size
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        loader = data
    else:
        raise TypeError(f"kind='flops_pe' needs a DataLoader, a Dataset, a Tensor or an "
                        f"iterable of batches, got {type(data).__name__}")
    try:
        meta["batches_in_epoch"] = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass  # an IterableDataset or a generator: length unknown
    return loader, meta


def count_flops(model: Any, batches: Iterable[Any], max_batches: int | None = None
                ) -> FlopCount:
    """Forward FLOPs of `model` over `batches` (the first `max_batches`), in fvcore's
    convention (one per multiply-add; see FlopCounter), around the model call only, so data
    loading and transforms are not counted."""
    import torch

    device = _model_device(model)
    counter = FlopCounter(model)
    flops = n = 0
    samples: int | None = 0
    with _side_effects_undone(model), torch.no_grad():
        for batch in itertools.islice(batches, max_batches):
            args, kwargs = model_inputs(batch, device)
            flops += counter.count(args, kwargs)
            n += 1
            size = _leading_dim((args, kwargs))
            samples = None if samples is None or size is None else samples + size
    return FlopCount(flops, n, samples, counter.method(), counter.fallback)


class FlopCounter:
    """FLOPs of one forward call of a model, counted once per distinct input signature
    (shapes, dtypes, other arguments): the operators counted (matmul, convolution, norms, ...)
    cost what their shapes say, so the batches of an epoch that look alike are not run again.

    With fvcore importable (the `[prov4ml]` extra; imported here, at the first count, never
    at import time) the count is fvcore's `FlopCountAnalysis`, which is what yprov4ml uses: it
    traces the call and also counts norms and pooling. Otherwise, and for a call fvcore cannot
    trace (keyword inputs, tracing errors), it is torch's FlopCounterMode halved, which counts
    matmuls and convolutions only: the same number for models made of those, less for others.
    `method()` says which counted; both when some batches needed the fallback."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.fvcore = _fvcore_analysis()
        self.fallback: str | None = None if self.fvcore else "fvcore not importable"
        self.used: set[str] = set()
        self.cache: dict[Any, int] = {}

    def method(self) -> str:
        return "+".join(sorted(self.used, key=(FVCORE, HALVED).index)) or HALVED

    def count(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        key = _signature((args, kwargs))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        flops = None
        if self.fvcore is not None:
            if kwargs:
                self.fallback = "keyword inputs cannot be traced by fvcore"
            else:
                flops = self._fvcore(args)
        if flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                self.model(*args, **kwargs)
            flops = counter.get_total_flops() // 2
            self.used.add(HALVED)
        self.cache[key] = flops
        return flops

    def _fvcore(self, args: tuple[Any, ...]) -> int | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about the model's code
                analysis = self.fvcore(self.model, args)
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                analysis.tracer_warnings("none")
                flops = int(analysis.total())
        except Exception as e:  # noqa: BLE001 - tracing fails in many ways; counted otherwise
            self.fallback = f"fvcore could not trace the model: {type(e).__name__}: {e}"[:300]
            return None
        self.used.add(FVCORE)
        return flops


def _fvcore_analysis() -> Any:
    """fvcore's FlopCountAnalysis when fvcore is importable, else None (imported quietly: it
    uses torch.jit.script at import, which torch deprecates with a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = libraries.optional("fvcore.nn")
    return getattr(module, "FlopCountAnalysis", None)


def _signature(obj: Any) -> Any:
    """What a model call's FLOPs depend on: tensors by shape and dtype, other values by
    themselves (their repr when unhashable)."""
    torch = sys.modules["torch"]
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, *(_signature(o) for o in obj))
    if isinstance(obj, Mapping):
        return ("map", *((str(k), _signature(v)) for k, v in obj.items()))
    try:
        hash(obj)
    except TypeError:
        return ("repr", repr(obj))
    return ("value", obj)


def model_inputs(batch: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a batch is fed to the model: a mapping as keyword arguments (Hugging Face style), a
    tuple or list as `(inputs, targets, ...)` (what DataLoaders yield and Prov4ML reads as
    `x, _ = batch`), anything else as the single input."""
    if isinstance(batch, Mapping):
        return (), {str(k): _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty batch has no model input")
        batch = batch[0]
    return (_to_device(batch, device),), {}


def _to_device(obj: Any, device: Any) -> Any:
    torch = sys.modules["torch"]
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: Any) -> Any:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _leading_dim(obj: Any) -> int | None:
    """Batch size of a model input: the leading dimension of its first tensor."""
    torch = sys.modules["torch"]
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim else None
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, (tuple, list)) or isinstance(obj, Mapping):
        for value in values:
            size = _leading_dim(value)
            if size is not None:
                return size
    return None


@contextmanager
def _side_effects_undone(model: Any) -> Iterator[None]:
    """The counting pass is a real forward call, but training must go on as if it had not
    happened: buffers changed in place (BatchNorm running statistics, counters) get their
    values back, RNG streams are forked (dropout, shuffling and augmentation draw the same
    numbers as without the measurement), and `watch` hooks are paused."""
    import torch

    saved = [(b, b.detach().clone()) for b in model.buffers()]
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), watch.paused(model):
            yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:  # all of them: BatchNorm's kernel does not bump _version
                buf.copy_(copy)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
