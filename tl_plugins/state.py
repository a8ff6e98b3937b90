"""Per-model bookkeeping: which plugins are enabled, with which config, and what they installed.

The state lives in the model's instance ``__dict__`` under ``_tl_plugins_state`` and is deleted
when the last plugin is disabled, so a model with nothing enabled carries no trace of the host.
It is a plain object, so ``copy.deepcopy(model)`` copies it along with the seams that refer to it.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, overload

STATE_ATTR = "_tl_plugins_state"

class _Missing:
    """Marks "the instance had no such attribute"; survives deepcopy and pickling as itself."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self):  # a string: copy, deepcopy and pickle all give back the module's one instance
        return "_MISSING"


_MISSING = _Missing()


class BoundMethod:
    """A module-level function bound to a module instance, for per-instance method seams.

    ``types.MethodType`` pickles as ``getattr(module, function name)``, which fails on load (the
    instance has no attribute by the function's name), so a saved model with a plugin enabled could
    never be loaded. This pickles by the function's qualified name and the module itself, and
    deep-copies with the module like a bound method.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Any, obj: Any):
        self.__func__ = func
        self.__self__ = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (BoundMethod, (self.__func__, self.__self__))

    def __repr__(self) -> str:
        return f"<seam {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


@dataclass
class Override:
    """One per-instance attribute set on a module; ``previous`` is _MISSING if there was none."""

    module: Any
    attr: str
    previous: Any


@dataclass
class ModelState:
    """What the host knows about one model: enabled configs (in enable order) and installations."""

    active: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, list[Override]] = field(default_factory=dict)
    attention_seam_users: set[str] = field(default_factory=set)
    mlp_seam_users: set[str] = field(default_factory=set)
    # thread id -> attention calls of that thread running through the seam now (see busy_elsewhere)
    in_flight: dict[int, int] = field(default_factory=dict)

    def config(self, name: str) -> Any:
        """The config of plugin ``name`` on this model, or None if it is not enabled."""
        return self.active.get(name)


_LOCK = threading.Lock()


@contextlib.contextmanager
def running(state: Optional[ModelState]):
    """Mark one seam call of the current thread as in flight on the model of ``state``."""
    if state is None:
        yield
        return
    tid = threading.get_ident()
    with _LOCK:
        state.in_flight[tid] = state.in_flight.get(tid, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            left = state.in_flight.get(tid, 1) - 1
            if left:
                state.in_flight[tid] = left
            else:
                state.in_flight.pop(tid, None)


def check_not_busy_elsewhere(model: Any, action: str) -> None:
    """Refuse to change a model's plugins while another thread is running it through a seam.

    Configuration is per model, not per thread: two threads that need different configurations
    need two models (``copy.deepcopy(model)``). Changing it mid-forward would mix two
    configurations within one forward pass, silently.
    """
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        return
    me = threading.get_ident()
    with _LOCK:
        others = [t for t, n in state.in_flight.items() if n and t != me]
    if others:
        raise RuntimeError(
            f"{action}: another thread (id {others[0]}) is running this model through a plugin seam right "
            "now; plugin configuration is per model, not per thread, so changing it now would mix "
            "configurations within that forward pass. Give each thread its own model (copy.deepcopy).")


@overload
def get_state(model: Any, create: Literal[True]) -> ModelState: ...
@overload
def get_state(model: Any, create: bool = False) -> ModelState | None: ...
def get_state(model: Any, create: bool = False) -> ModelState | None:
    """The model's bookkeeping (created on first use with ``create=True``), or None."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = ModelState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


def drop_state_if_empty(model: Any) -> None:
    state = model.__dict__.get(STATE_ATTR)
    if state is not None and not state.active and not any(state.overrides.values()):
        del model.__dict__[STATE_ATTR]


def set_instance_attr(model: Any, owner: str, module: Any, attr: str, value: Any) -> None:
    """Set ``module.attr = value`` on the instance, remembering what to restore for ``owner``."""
    state = get_state(model, create=True)
    previous = module.__dict__.get(attr, _MISSING)
    state.overrides.setdefault(owner, []).append(Override(module, attr, previous))
    # object.__setattr__: bridge components forward attribute assignment to the wrapped HF module,
    # and nn.Module.__setattr__ would try to register modules/parameters.
    object.__setattr__(module, attr, value)


def restore_owner(model: Any, owner: str) -> None:
    """Undo every per-instance attribute ``owner`` set, newest first."""
    state = get_state(model)
    if state is None:
        return
    for ov in reversed(state.overrides.pop(owner, [])):
        if ov.previous is _MISSING:
            ov.module.__dict__.pop(ov.attr, None)
        else:
            object.__setattr__(ov.module, ov.attr, ov.previous)
