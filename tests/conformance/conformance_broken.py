"""A deliberately wrong plugin: attention that ignores the padding mask.

The negative control of the conformance suite: run under TransformerLens's tests it must produce
failures (padding and batched KV-cache tests), which shows the harness can catch a plugin bug of
a realistic kind, not only crashes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tl_plugins import hookimpl

NAME = "conformance-broken-padding"


@dataclass
class BrokenConfig:
    """No options."""


@hookimpl
def tl_plugins_register(register):
    register(NAME, config=BrokenConfig, summary="negative control: attention ignoring padding",
             changes_forward=True, attention_seam=True)


@hookimpl
def tl_plugins_attention(call):
    if call.config(NAME) is None:
        return None
    return dataclasses.replace(call, attention_mask=None).dense()
