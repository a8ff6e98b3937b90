"""Gemma 3 270M loaded once per test session (per backend), shared by the Gemma test files.

Loading costs about 10 s and 1 GB per backend; every Gemma test file takes its models from here.
"""

from __future__ import annotations

import copy
import functools


@functools.lru_cache(maxsize=None)
def hf_and_tokenizer():
    from tl_plugins.models import gemma3

    return gemma3.load_hf(progress=False)


@functools.lru_cache(maxsize=None)
def model(backend: str):
    """The unprocessed model on ``backend`` ("hooked" or "bridge"), built from the one HF load."""
    import torch

    from tl_plugins.models import gemma3, tiny
    from tl_plugins.models.local import hf_to_bridge

    hf, tok = hf_and_tokenizer()
    if backend == "bridge":
        m = hf_to_bridge(copy.deepcopy(hf), tok)
        m.cfg.default_prepend_bos = True
    else:
        tiny.resolve_backend("hooked")
        m = gemma3.hf_to_hooked(hf, tok, dtype=torch.float32)
    m.tl_plugins_load_seconds = 0.0
    return m


def backends() -> list[str]:
    from tl_plugins.models import tiny

    return (["hooked"] if tiny.hooked_available() else []) + ["bridge"]
