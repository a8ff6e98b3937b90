"""Built-in plugin: dense attention, the answer of the attention seam when no plugin computes ``z``."""

from __future__ import annotations

from tl_plugins.hookspecs import hookimpl


@hookimpl(trylast=True)
def tl_plugins_attention(call):
    return call.dense()
