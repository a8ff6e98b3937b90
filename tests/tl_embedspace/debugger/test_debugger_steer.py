"""The ``steer`` plugin against plain TransformerLens hooks doing the same edit (forward,
``run_with_cache``, ``generate``), bit-exact restore on disable, no hook left behind, JSON
round trips and refused configs."""

from __future__ import annotations

import json

import pytest
import torch

import tl_plugins
from tl_embedspace import debugger
from tl_embedspace.debugger import steer
from tl_plugins import backends

TOKS = torch.tensor([[5, 9, 13, 7, 22, 31, 4]])
CASES = [
    [{"layer": 1, "unit": 3, "op": "set", "value": 2.5, "positions": "all"}],
    [{"layer": 0, "unit": 7, "op": "scale", "value": -3.0, "positions": "last"}],
    [{"layer": 1, "unit": 100, "op": "add", "value": 1.5, "positions": [2, 5]}],
    [{"layer": 0, "unit": 1, "op": "set", "value": 0.0, "positions": "1:"},
     {"layer": 0, "unit": 1, "op": "add", "value": 0.25, "positions": 3},
     {"layer": 1, "op": "resid_add", "vector": [0.1] * 64, "value": 2.0, "positions": "all"}],
]


def _hooks_state(model):
    return [(n, len(getattr(hp, "_forward_hooks", {})), len(getattr(hp, "fwd_hooks", [])))
            for n, hp in model.hook_dict.items()]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_equal_to_plain_hooks(llama, case):
    be = backends.detect(llama)
    ivs = CASES[case]
    before_hooks = _hooks_state(llama)
    with torch.no_grad():
        base = llama(TOKS)
        with be.hooks(steer.reference_hooks(be, ivs)):
            ref = llama(TOKS)
            _, ref_cache = llama.run_with_cache(TOKS)
        tl_plugins.enable(llama, "steer", interventions=ivs)
        try:
            got = llama(TOKS)
            _, cache = llama.run_with_cache(TOKS)
        finally:
            tl_plugins.disable(llama, "steer")
        after = llama(TOKS)
    assert not torch.equal(got, base)
    assert torch.equal(got, ref)
    for l in range(be.n_layers):
        name = be.hook_name("mlp_post", l)
        assert torch.equal(cache[name], ref_cache[name])  # run_with_cache records the steered values
    assert torch.equal(after, base)
    assert _hooks_state(llama) == before_hooks
    assert tl_plugins.active(llama) == {}


def test_generate_equals_hooked_generate(llama):
    be = backends.detect(llama)
    for ivs in (CASES[0], CASES[1], CASES[2]):
        res = debugger.generate(llama, TOKS[0, :4].tolist(), ivs, max_new_tokens=6, stop_at_eos=False)
        kw = {"use_past_kv_cache": False} if isinstance(steer.SteerConfig(ivs).interventions[0].positions, list) else {}
        with torch.no_grad(), be.hooks(steer.reference_hooks(be, ivs)):
            ref = be.generate(TOKS[:, :4], 6, stop_at_eos=False, **kw)
        with torch.no_grad():
            plain = be.generate(TOKS[:, :4], 6, stop_at_eos=False)
        assert res["steered"]["ids"] == ref[0, 4:].tolist()
        assert res["plain"]["ids"] == plain[0, 4:].tolist()
    assert tl_plugins.active(llama) == {}


def test_token_direction_and_toggle(llama):
    with torch.no_grad():
        base = llama(TOKS)
        with tl_plugins.enabled(llama, "steer", interventions=[
                {"layer": 1, "op": "resid_add", "token": "w9", "value": 5.0, "positions": "last"}]):
            up = llama(TOKS)
        with tl_plugins.enabled(llama, "steer", interventions=[
                {"layer": 1, "unit": 3, "op": "set", "value": 9.0, "enabled": False}]):
            off = llama(TOKS)
    tid = llama.tokenizer.encode("w9", add_special_tokens=False)[0]
    assert float(up[0, -1].log_softmax(-1)[tid]) > float(base[0, -1].log_softmax(-1)[tid])
    assert torch.equal(up[0, :-1], base[0, :-1])
    assert torch.equal(off, base)


def test_json_round_trip(tmp_path, llama):
    ivs = CASES[3]
    path = tmp_path / "iv.json"
    debugger.save(path, ivs)
    loaded = debugger.load(path)
    assert json.loads(path.read_text())["interventions"][0]["positions"] == [1, None]
    with torch.no_grad():
        tl_plugins.enable(llama, "steer", interventions=ivs)
        a = llama(TOKS)
        tl_plugins.enable(llama, "steer", interventions=loaded)
        b = llama(TOKS)
        tl_plugins.disable(llama, "steer")
    assert torch.equal(a, b)
    assert steer.SteerConfig.from_json(steer.SteerConfig(ivs).to_json()).to_json() == steer.SteerConfig(ivs).to_json()
    assert steer.Intervention.coerce("L1U5").unit == 5


def test_refused(llama):
    with torch.no_grad():
        base = llama(TOKS)
    with pytest.raises(IndexError, match=r"interventions\[0\].unit: got 128 in layer 1; accepted: an int in \[0, 127\]"):
        tl_plugins.enable(llama, "steer", interventions=[{"layer": 1, "unit": 128}])
    with pytest.raises(IndexError, match="layer: got 2"):
        tl_plugins.enable(llama, "steer", interventions=[{"layer": 2, "unit": 0}])
    with pytest.raises(ValueError, match="op: got 'zero'"):
        tl_plugins.enable(llama, "steer", interventions=[{"layer": 0, "unit": 0, "op": "zero"}])
    with pytest.raises(ValueError, match="positions: got 'first'"):
        tl_plugins.enable(llama, "steer", interventions=[{"layer": 0, "unit": 0, "positions": "first"}])
    with pytest.raises(ValueError, match="vector: 3 floats"):
        tl_plugins.enable(llama, "steer", interventions=[{"layer": 0, "op": "resid_add", "vector": [1, 2, 3]}])
    with pytest.raises(ValueError, match="unit: got 'L1U2x'"):
        steer.Intervention.coerce("L1U2x")
    assert tl_plugins.active(llama) == {}
    with torch.no_grad():
        assert torch.equal(llama(TOKS), base)
