"""Built-in plugin: dense attention, the answer of the attention seam when no plugin computes ``z``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tl_plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from tl_plugins.seams import AttentionCall


@hookimpl(trylast=True)
def tl_plugins_attention(call: AttentionCall) -> Float[torch.Tensor, "batch query_pos head_index d_head"]:
    return call.dense()
