"""Models as state_dicts, read from the journal's `torch.save` of a whole module without
importing or running any of its code (the journal is untrusted input)."""

from __future__ import annotations

from typing import Any

from itwinai_journal.errors import ItwinaiSyncError


class _Stub:
    """Stands in for a class of a pickled module, which is never imported: keeps its state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class NotAModule(ItwinaiSyncError):
    """A model's torch.save file could not be read as a module's state_dict; the message says
    why, for the note."""


def state_dict_from_module(file: Any) -> dict[str, Any]:
    """The `state_dict()` of a `torch.save`d `nn.Module` (keys and tensors, in the order
    `Module.state_dict` gives: parameters, persistent buffers, then submodules), rebuilt
    without importing the module's classes or running any code of the journal's: the journal
    is untrusted input, and the training code need not be importable where the sync runs.

    The pickle is read by torch's own weights-only unpickler, which vets every opcode and
    argument; the globals it does not allow (the module classes, a function held as an
    attribute) are listed first without unpickling (`get_unsafe_globals_in_checkpoint`) and
    allowed as inert `_Stub` classes under their names, which only take the state they are
    given. Raises NotAModule saying why when that cannot be done: a torch without those
    functions (before 2.5), a pickle the weights-only unpickler refuses, an object that is not
    a module. Modules that override `state_dict` (extra state, custom keys) are read as plain
    modules."""
    import torch

    serialization = torch.serialization
    if not (hasattr(serialization, "get_unsafe_globals_in_checkpoint")
            and hasattr(serialization, "safe_globals")):
        raise NotAModule(f"torch {torch.__version__} cannot read a module's pickle without "
                         "running it (torch 2.5 or later can)")
    try:
        names = serialization.get_unsafe_globals_in_checkpoint(file)
        file.seek(0)
        stubs = []
        for qualified in names:
            module, _, name = qualified.rpartition(".")
            stubs.append((type(name, (_Stub,), {"__module__": module}), qualified))
        with serialization.safe_globals(stubs):
            root = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch.save file, or one the unpickler refuses
        raise NotAModule(f"torch's weights-only unpickler cannot read it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(root, _Stub) or not isinstance(vars(root).get("_modules"), dict):
        raise NotAModule(f"it holds a {type(root).__name__}, not a torch.nn.Module")
    state: dict[str, Any] = {}

    def walk(module: Any, prefix: str) -> None:
        attrs = vars(module)
        transient = attrs.get("_non_persistent_buffers_set") or set()
        for key, tensor in (attrs.get("_parameters") or {}).items():
            if isinstance(tensor, torch.Tensor):
                state[prefix + key] = tensor.detach()
        for key, tensor in (attrs.get("_buffers") or {}).items():
            if isinstance(tensor, torch.Tensor) and key not in transient:
                state[prefix + key] = tensor.detach()
        for key, child in (attrs.get("_modules") or {}).items():
            if isinstance(child, _Stub):
                walk(child, f"{prefix}{key}.")

    walk(root, "")
    return state


# -- after yprov4ml: the final document, the graph, the swap -----------------------------------
