"""A deliberately wrong plugin: attention that ignores the padding mask.

The negative control of the conformance suite: run under TransformerLens's tests it must produce
failures (padding and batched KV-cache tests, on HookedTransformer and on TransformerBridge),
which shows the harness can catch a plugin bug of a realistic kind, not only crashes.
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
    changes = {"attention_mask": None}
    if any(f.name == "raw_mask" for f in dataclasses.fields(call)):
        # TransformerBridge: its dense route applies the mask the library was given (raw_mask);
        # without it the library applies the causal mask alone, so padding is ignored there too
        changes["raw_mask"] = None
    return dataclasses.replace(call, **changes).dense()
