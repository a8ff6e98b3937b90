"""The example plugin in docs/contract.md runs as written and does what it says."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

import tl_plugins

DOC = Path(__file__).resolve().parents[2] / "docs" / "contract.md"


def test_documented_plugin_zeroes_heads_like_a_hook():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("my_plugin")
    sys.modules["my_plugin"] = module  # dataclasses look their module up there
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    tl_plugins.register_plugin(module, name="ablate")
    try:
        model = tl_plugins.models.load("tiny-llama")
        tokens = torch.randint(0, 90, (1, 10), generator=torch.Generator().manual_seed(1))

        def zero_head(z, hook):
            z[:, :, 1] = 0
            return z

        oracle = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
        with tl_plugins.enabled(model, "ablate", heads=((0, 1),)):
            out = model(tokens)
        assert torch.equal(out, oracle)
    finally:
        tl_plugins.unregister_plugin(name="ablate")
        sys.modules.pop("my_plugin", None)
