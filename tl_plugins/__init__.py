"""tl_plugins: one pluggy host for TransformerLens plugins.

    import tl_plugins
    model = tl_plugins.models.load("tiny-gpt2")
    tl_plugins.enable(model, "topk", k=32)
    with tl_plugins.enabled(model, "topk", k=8):
        logits = model(tokens)
    tl_plugins.disable(model, "topk")

Plugins implement the hooks in :mod:`tl_plugins.hookspecs` with ``@tl_plugins.hookimpl`` and are
found through the ``tl_plugins`` entry-point group.
"""

from __future__ import annotations

# isort: off
# the marker first: modules imported below may import it from the package while it initialises
from tl_plugins.hookspecs import hookimpl  # noqa: F401
# isort: on
from tl_plugins import models  # noqa: E402,F401
from tl_plugins.api import active, disable, enable, enabled, list_plugins  # noqa: E402
from tl_plugins.errors import (  # noqa: E402
    ModelFetchError,
    NotEnabledError,
    PluginBlockedError,
    TLPluginsError,
    UnknownModelError,
    UnknownPluginError,
    UnsupportedModelError,
)
from tl_plugins.plugins import (  # noqa: E402
    get_plugin_manager,
    register_plugin,
    reset_plugin_manager,
    unregister_plugin,
)
from tl_plugins.weights import Processing, WeightView, weights  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "hookimpl",
    "enable",
    "disable",
    "enabled",
    "active",
    "list_plugins",
    "weights",
    "WeightView",
    "Processing",
    "models",
    "get_plugin_manager",
    "register_plugin",
    "unregister_plugin",
    "reset_plugin_manager",
    "TLPluginsError",
    "UnknownPluginError",
    "UnknownModelError",
    "PluginBlockedError",
    "NotEnabledError",
    "UnsupportedModelError",
    "ModelFetchError",
]
