"""A plugin that declares both seams and changes nothing: it checks the host's seams alone.

Enabling it installs the attention seam (TransformerLens's attention re-run step by step, the host's
dense ``trylast`` implementation computing the mix) and the MLP activation seam (``act_fn`` wrapped);
it implements no attention or activation hook itself, so every call falls through to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_plugins import hookimpl

NAME = "conformance-passthrough"


@dataclass
class PassthroughConfig:
    """No options."""


@hookimpl
def tl_plugins_register(register):
    register(
        NAME,
        config=PassthroughConfig,
        summary="declares attention and MLP seams, changes nothing (conformance of the host seams)",
        changes_forward=False,
        attention_seam=True,
        mlp_seam=True,
    )
