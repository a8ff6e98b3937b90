"""The real SmolLM2-135M (slow, small): a trace predicts " Paris" with direct effects that add up,
and a steer edit equals the plain hook on it."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_embedspace import debugger
from tl_embedspace.debugger import steer
from tl_plugins import backends

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return tl_plugins.models.load("smollm2-135m")


def test_trace_paris(smol):
    t = debugger.trace(smol, "The capital of France is", k=5, index=None, heads=False)
    assert t.targets.prediction[0] == " Paris"
    assert t.layers.post_rank.iloc[-1] == 1
    assert len(t.sub_updates) == 5 * 30
    with pytest.raises(ValueError, match=r"target: .* is not a single token: it tokenises into \d+ tokens"):
        debugger.trace(smol, "The capital of France is", target=" Parisian capital")


def test_steer_equals_hook(smol):
    be = backends.detect(smol)
    toks = be.to_tokens("The capital of France is")
    ivs = [{"layer": 20, "unit": 345, "op": "scale", "value": 5.0, "positions": "last"}]
    with torch.no_grad():
        with be.hooks(steer.reference_hooks(be, ivs)):
            ref = smol(toks)
        with tl_plugins.enabled(smol, "steer", interventions=ivs):
            got = smol(toks)
    assert torch.equal(got, ref)
