"""The real Gemma 3 270M (slow): post-attention and post-MLP norms, vocabulary 262,144. A trace's
components add up to the model's own logit through the frozen norms, and a steer edit equals the
plain hook on hook_post."""

from __future__ import annotations

import pytest
import torch

import tl_plugins
from tl_embedspace import debugger
from tl_embedspace.debugger import steer
from tl_plugins import backends

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return tl_plugins.models.load("gemma3-270m")


def test_trace_adds_up_to_the_logit(gemma):
    text = "The capital of France is"
    t = debugger.trace(gemma, text, k=100_000, heads=True, index=None, n_tokens=0)
    be = backends.detect(gemma)
    toks = be.to_tokens(text)
    W = tl_plugins.weights(gemma)
    with torch.no_grad():
        logits, cache = gemma.run_with_cache(toks)
    pos = toks.shape[1] - 1
    tid = int(t.targets.target_id[0])
    assert tid == int(logits[0, pos].argmax())
    d = W.ln_final_w() * W.W_U[:, tid] / float(t.targets.sigma_final[0])
    total = float(cache[be.hook_name("resid_pre", 0)][0, pos] @ d)
    total += float(t.sub_updates.direct_effect.sum()) + float(t.heads.direct_effect.sum())
    # Gemma has no biases in attention or MLP: nothing else is written
    assert float(W.b_O.abs().max()) == 0 and float(W.b_out.abs().max()) == 0
    assert total == pytest.approx(float(logits[0, pos, tid]), rel=1e-3, abs=1e-2)
    assert (t.sub_updates.post_norm_scale > 0).all() and (t.sub_updates.post_norm_scale != 1).any()


def test_steer_equals_hook(gemma):
    be = backends.detect(gemma)
    toks = be.to_tokens("The capital of France is")
    ivs = [{"layer": 10, "unit": 345, "op": "scale", "value": 4.0, "positions": "last"},
           {"layer": 15, "unit": 7, "op": "set", "value": 0.0, "positions": "all"}]
    with torch.no_grad():
        with be.hooks(steer.reference_hooks(be, ivs)):
            ref = gemma(toks)
        with tl_plugins.enabled(gemma, "steer", interventions=ivs):
            got = gemma(toks)
        plain = gemma(toks)
    assert torch.equal(got, ref)
    assert not torch.equal(got, plain)
