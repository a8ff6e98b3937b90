"""Which top-k attention backend a call asks for: the names, ``use_backend`` and ``TL_TOPK_BACKEND``.

A call's backend is chosen once, at the start of the call (``tl_topk.topk_attention``, or one
attention call of a model with the ``topk`` plugin enabled), by ``requested_backend``; the first
of these that names a backend other than ``"auto"`` wins:

  1. the explicit argument: ``topk_attention(..., backend=...)``, or ``backend=`` given to
     ``tl_plugins.enable(model, "topk", ...)``;
  2. the innermost ``with tl_topk.ops.use_backend(...)`` block around the call;
  3. the environment variable ``TL_TOPK_BACKEND`` (read by ``backend_from_env`` at that moment,
     not at import, so a change takes effect at the next call);
  4. otherwise ``"auto"``: ``tl_topk.ops.attention.resolve_backend`` picks from the device and the
     call's shape.

The functions below the choice (``tl_topk.ops.dense``, ``chunked``, ``cpp_backend``, ``triton_backend``, ``flex``,
``mixed``) take the resolved backend as an argument and never read the environment.
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Iterator, Optional

BACKENDS = ("auto", "dense", "chunked", "cpp", "triton", "flex")
ENV_BACKEND = "TL_TOPK_BACKEND"

# The innermost ``use_backend`` block's backend; per thread and per asyncio task (a ContextVar).
_CONTEXT_BACKEND: ContextVar[Optional[str]] = ContextVar("tl_topk_backend", default=None)


def check_backend(value: object, argument: str = "backend") -> str:
    """``value`` if it is one of ``BACKENDS``; else ``ValueError`` naming ``argument``, the value and
    the accepted names."""
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"{argument}: got {value!r}; accepted: {', '.join(BACKENDS)}")
    return value


def backend_from_env() -> Optional[str]:
    """``TL_TOPK_BACKEND`` (stripped, lower-cased), or None when unset or empty. The one place the
    variable is read; raises ``ValueError`` naming it for a value not in ``BACKENDS``."""
    raw = os.environ.get(ENV_BACKEND, "").strip().lower()
    return check_backend(raw, ENV_BACKEND) if raw else None


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Context manager: top-k attention calls inside the block that pass no explicit backend (or
    ``"auto"``) use ``backend``. Blocks nest (the innermost wins; ``use_backend("auto")`` hands the
    choice back to ``TL_TOPK_BACKEND`` and the automatic pick) and the previous choice is restored
    on exit, also when the block raises. The name is checked on entry.

        with tl_topk.ops.use_backend("chunked"):
            z = tl_topk.topk_attention(q, k, v, 32, causal=True)   # chunked
            logits = model(tokens)                                  # chunked, if enabled with auto
    """
    token = _CONTEXT_BACKEND.set(check_backend(backend))
    try:
        yield
    finally:
        _CONTEXT_BACKEND.reset(token)


def requested_backend(backend: str = "auto") -> str:
    """The backend a call asks for, in the order of the module docstring: ``backend`` (``"auto"``: no
    choice), the innermost ``use_backend`` block, ``TL_TOPK_BACKEND``, else ``"auto"``."""
    if check_backend(backend) != "auto":
        return backend
    context = _CONTEXT_BACKEND.get()
    if context is not None and context != "auto":
        return context
    return backend_from_env() or "auto"


__all__ = ["BACKENDS", "ENV_BACKEND", "backend_from_env", "check_backend", "requested_backend", "use_backend"]
