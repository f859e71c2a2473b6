"""How journal records become W&B values: history keys, the journal step of a row, artifact
names and the watched model's graph (deterministic mappings, reported by the exporter)."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

#: History key holding the highest journal seq a row covers (a leading '_' keeps it out of the
#: W&B charts, like _step and _timestamp; wandb 0.31 accepts and stores it).
CURSOR_KEY = "_itwinai_seq"
#: Summary key for the cursor over trailing records that are not history rows, written after
#: them. Not CURSOR_KEY itself: wandb-core writes the summary it derives from a history row
#: *before* that row in the transaction log, so a summary `_itwinai_seq` can be on disk while
#: its row is not (a kill in between); explicit summary writes are in order.
TAIL_KEY = "_itwinai_seq_tail"
#: History key carrying the journal's step, the x axis of the charts of metrics logged with one.
STEP_KEY = "itwinai/step"
#: Kinds that become values of a history row (torch as well, when its object loads safely).
ROW_KINDS = frozenset({"metric", "histogram", "image", "figure", "text", "dict"})
#: Kinds whose values are charted against the journal step.
STEPPED_KINDS = frozenset({"metric", "dict"})
#: What an empty journal name is stored as.
EMPTY_KEY = "itwinai_empty_name"
#: Types whose JSON list `wandb.log` would have taken as an array (a list, or a histogram above
#: 32 values): the list is handed to it as a numpy array.
ARRAY_TYPES = frozenset({"numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter"})
#: Returned by `_history_item` when a record shows nothing in the history (None is a value).
NOTHING = object()
ARTIFACT_KINDS = frozenset({"torch", "artifact", "model", "best_model"})
PLOTLY = "application/vnd.plotly.v1+json"
_BAD_ARTIFACT = re.compile(r"[^A-Za-z0-9_.\-]")


def wandb_run_id(journal_id: str, rank: int) -> str:
    """Deterministic W&B run id of a journal rank (W&B ids allow [a-z0-9])."""
    return hashlib.sha1(f"{journal_id}\0{rank}".encode()).hexdigest()[:16]


def history_key(name: str) -> str:
    """The W&B history key of a journal name, deterministically. W&B hides keys starting with
    '_' and owns _step, _timestamp, _runtime: such names get an 'itwinai' prefix (`_loss` ->
    `itwinai_loss`); a name equal to the step key gets a trailing '_'; the empty name, whose
    value `wandb.log` drops without a word (and `define_metric` refuses), is EMPTY_KEY."""
    if name == STEP_KEY:
        return name + "_"
    if not name:
        return EMPTY_KEY
    return "itwinai" + name if name.startswith("_") else name


def chartable(key: str) -> bool:
    """Whether `define_metric` can give `key` the journal step as x axis: it refuses a '*'
    but as the last character, where it makes a glob over other keys."""
    return "*" not in key


def row_step(step: int | None, meta: dict[str, Any]) -> int | float | None:
    """The journal step a record is charted at (the row's STEP_KEY): its step, or, for a step
    the journal's int64 column could not hold, the exact one from meta['step'] when it is a
    number (1.5, 2**70: W&B's numbers are float64), or the number a string step spells ('12'
    -> 12.0, as float() reads it); NaN for one that is neither (a list, 'abc', inf), so that
    it is charted at no step rather than at a neighbour's."""
    if step is not None or "step" not in meta:
        return step
    exact = meta["step"]
    if isinstance(exact, str):
        try:
            exact = float(exact)
        except ValueError:
            return math.nan
    if isinstance(exact, (int, float)) and not isinstance(exact, bool) and math.isfinite(exact):
        return exact
    return math.nan


def artifact_name(name: str) -> str:
    """W&B artifact names allow [A-Za-z0-9_.-], up to 128 characters."""
    mapped = _BAD_ARTIFACT.sub("-", name).strip(".") or "artifact"
    if len(mapped) > 128:
        mapped = mapped[:119] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return mapped



def graph(topo: dict[str, Any]) -> Any:
    """The watched module's topology as the wandb.Graph that wandb.watch would log."""
    import wandb
    from wandb.sdk.data_types.graph import Node

    shown = wandb.Graph(format="torch")
    for i, m in enumerate(topo.get("modules", [])):
        params = list(m.get("parameters", {}).items())
        shown.add_node(Node(id=i, name=m.get("name") or topo.get("name"),
                            class_name=m.get("class"), parameters=params,
                            num_parameters=[numel(s) for _, s in params]))
    return shown


def numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
