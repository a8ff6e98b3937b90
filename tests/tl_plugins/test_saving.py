"""``torch.save`` of a model with plugins enabled round-trips: the loaded model comes back with the
same plugins enabled and the same outputs, and disabling it restores the unmodified model's outputs
bit-exactly. (It used to save, and then fail to load, forever.)"""

from __future__ import annotations

import io

import pytest
import torch

import tl_plugins


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("backend", ["auto", "bridge"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_saved_enabled_model_loads_enabled_and_disables_cleanly(name, backend, tokens):
    if backend == "bridge":
        pytest.importorskip("transformer_lens.model_bridge")
    model = tl_plugins.models.load(name, backend=backend)
    try:
        torch.save(model, io.BytesIO())
    except (AttributeError, TypeError) as exc:  # the library's own model class cannot be pickled
        pytest.skip(f"{type(model).__name__} cannot be saved even without a plugin: {exc}")
    ref = model(tokens)
    tl_plugins.enable(model, "topk", k=3, ff_k=8)
    enabled_out = model(tokens)
    loaded = _roundtrip(model)
    assert set(tl_plugins.active(loaded)) == {"topk"} and tl_plugins.active(loaded)["topk"].k == 3
    assert torch.equal(loaded(tokens), enabled_out)
    tl_plugins.disable(loaded)
    assert torch.equal(loaded(tokens), ref)
    assert tl_plugins.active(model) == {"topk": tl_plugins.active(model)["topk"]}  # the original is untouched
    tl_plugins.disable(model)
    assert torch.equal(model(tokens), ref)
