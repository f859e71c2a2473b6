"""Numbers as the journal's columns hold them: a metric as float64, a step or batch index as
int64 (with its exact form in meta when it is not one), and numbers given in place of a
measurement."""

from __future__ import annotations

import math
from typing import Any

from itwinai_journal.errors import ItwinaiSyncError
from itwinai_journal.format.schema import INT64_MAX, INT64_MIN

from .origin import module_of


class NotAPlainMetric(ItwinaiSyncError, TypeError):
    """`metric_value` got something that is not one real number: a complex number with an
    imaginary part, or not a number at all. `metric_fields` says how such a metric is kept."""


def one_element(item: Any) -> Any:
    """The element of a one-element numpy array or torch tensor (any shape), as a numpy or
    Python scalar; anything else unchanged. Trackers take these as numbers: MLflow through
    float(), TensorBoard and W&B by squeezing them."""
    mod = module_of(item)
    if mod == "numpy":
        if getattr(item, "ndim", 0) and item.size == 1:
            return item.reshape(()).item() if item.dtype.kind in "biufc" else item.flat[0]
    elif mod == "torch":
        import torch

        if isinstance(item, torch.Tensor) and item.numel() == 1:
            return item.detach().reshape(()).cpu().item()
    return item


def is_complex(number: Any) -> bool:
    return isinstance(number, complex) or (
        module_of(number) == "numpy" and getattr(number, "dtype", None) is not None
        and number.dtype.kind == "c")


def metric_value(item: Any) -> float:
    """A metric as float64: anything MLflow's `float()` takes (Python and numpy numbers of
    every width, bool, Decimal, Fraction, numeric strings), one-element arrays and tensors of
    any shape and dtype, and complex numbers whose imaginary part is 0. Anything else raises
    NotAPlainMetric (a TypeError)."""
    if isinstance(item, (int, float)):
        try:
            return float(item)
        except OverflowError:
            raise NotAPlainMetric(f"the int {item} is beyond float64") from None
    number = one_element(item)
    if is_complex(number):
        if number.imag == 0:
            return float(number.real)
        raise NotAPlainMetric(f"a complex number with an imaginary part: {number!r}")
    if not isinstance(number, (list, tuple, dict, set)) and number is not None:
        try:
            return float(number)
        except (TypeError, ValueError, OverflowError):
            pass
    raise NotAPlainMetric(f"not a number: {type(item).__name__}")


def index_value(value: Any) -> tuple[int | None, Any]:
    """`step` or `batch_idx` for the journal's int64 column: (the integer, None); or, when the
    value is not a whole number within int64 (1.5, 2**63, '3'), (None, its exact form) for
    the record's meta. Whole floats and numpy/torch integers are integers."""
    if value is None:
        return None, None
    if isinstance(value, int):
        number: int | None = int(value)
    elif isinstance(value, (str, bytes)):
        number = None
    else:
        number = _whole(value)
    if number is not None and INT64_MIN <= number <= INT64_MAX:
        return number, None
    return None, _exact(value)


def _whole(value: Any) -> int | None:
    index = getattr(value, "__index__", None)
    if index is not None:
        try:
            return int(index())
        except (TypeError, ValueError, RuntimeError):
            pass
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(f) if f.is_integer() else None


def _exact(value: Any) -> Any:
    """A JSON-able exact form of a step or batch_idx that the int64 column cannot hold."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if module_of(value) in ("numpy", "torch") and hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


def given_number(item: Any) -> float | None:
    """`item` as a float when it is a number (Python, numpy, 0-d tensor), else None: the
    measured kinds take a number given in place of the object they measure."""
    if item is None or isinstance(item, (tuple, list, str, bytes)):
        return None
    try:
        return metric_value(item)
    except TypeError:
        return None


def non_negative(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value
