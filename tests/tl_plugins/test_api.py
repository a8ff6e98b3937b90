"""enable / disable / enabled / active against the unmodified model as the oracle."""

from __future__ import annotations

import copy

import pytest
import torch

import tl_plugins
from tl_plugins.errors import NotEnabledError, UnknownPluginError, UnsupportedModelError


def _fingerprint(model):
    """Everything a plugin could leave behind: instance attributes, parameters, buffers, hooks."""
    attrs = {name: sorted(m.__dict__) for name, m in model.named_modules()}
    attrs[""] = sorted(model.__dict__)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = sorted(n for n, _ in model.named_buffers())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    return attrs, params, buffers, hooks


def _same_fingerprint(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert a[2] == b[2]
    assert a[3] == b[3]


def _seam_methods(model):
    """The methods the attention seam overrides per instance on every attention module."""
    from tl_plugins.backends.bridge import attention_family, is_bridge

    if is_bridge(model):
        family, _ = attention_family(model.blocks[0].attn)
        return (family.catch, "_update_kv_cache")  # catch point, throw point
    return ("forward",)


def _oracle_scaled(model, tokens, factor):
    """The effect of the test plugin computed with ordinary TransformerLens hooks."""
    def scale(x, hook):
        return x * factor
    hooks = [(f"blocks.{l}.attn.hook_z", scale) for l in range(model.cfg.n_layers)]
    hooks += [(f"blocks.{l}.mlp.hook_post", scale) for l in range(model.cfg.n_layers)]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_enable_changes_forward_like_hooks_and_disable_restores_bit_exactly(tiny_model, tokens, scale_plugin):
    ref = tiny_model(tokens)
    oracle = _oracle_scaled(tiny_model, tokens, 3.0)
    # after a plain forward: a bridge's components record per-forward flags on first use
    # (``_fired_hook_out``); what enable/disable must not add is anything beyond those
    before = _fingerprint(tiny_model)
    tl_plugins.enable(tiny_model, "scale", factor=3.0)
    out = tiny_model(tokens)
    torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, ref)
    assert list(tl_plugins.active(tiny_model)) == ["scale"]
    tl_plugins.disable(tiny_model, "scale")
    assert torch.equal(tiny_model(tokens), ref)
    assert tl_plugins.active(tiny_model) == {}
    _same_fingerprint(before, _fingerprint(tiny_model))


def test_seam_with_passing_plugin_is_bit_exact(tiny_model, tokens, scale_plugin):
    """factor=1 makes the plugin pass: the seam's own dense attention must equal TL's exactly."""
    ref, ref_cache = tiny_model.run_with_cache(tokens)
    tl_plugins.enable(tiny_model, "scale", factor=1.0)
    out, cache = tiny_model.run_with_cache(tokens)
    assert torch.equal(out, ref)
    assert set(cache.keys()) == set(ref_cache.keys())
    for key in ref_cache.keys():
        assert torch.equal(cache[key], ref_cache[key]), key
    tl_plugins.disable(tiny_model)


def test_every_hook_point_still_fires(tiny_model, tokens, scale_plugin):
    def fired_names():
        fired = []
        tiny_model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: fired.append(hook.name))])
        return fired

    expected = fired_names()
    tl_plugins.enable(tiny_model, "scale", factor=2.0)
    assert fired_names() == expected  # same hooks, same order
    tl_plugins.disable(tiny_model, "scale")


def test_enable_twice_reconfigures(tiny_model, tokens, scale_plugin):
    tl_plugins.enable(tiny_model, "scale", factor=2.0)
    tl_plugins.enable(tiny_model, "scale", factor=3.0)
    assert tl_plugins.active(tiny_model)["scale"].factor == 3.0
    torch.testing.assert_close(tiny_model(tokens), _oracle_scaled_disabled(tiny_model, tokens, 3.0))
    tl_plugins.disable(tiny_model, "scale")
    assert tl_plugins.active(tiny_model) == {}


def _oracle_scaled_disabled(model, tokens, factor):
    cfg = tl_plugins.active(model)
    tl_plugins.disable(model)
    out = _oracle_scaled(model, tokens, factor)
    for name, c in cfg.items():
        tl_plugins.enable(model, name, factor=c.factor)
    return out


def test_refused_reconfigure_keeps_old_config(tiny_model, tokens, scale_plugin):
    tl_plugins.enable(tiny_model, "scale", factor=2.0)
    out = tiny_model(tokens)
    with pytest.raises(ValueError, match="factor"):
        tl_plugins.enable(tiny_model, "scale", factor=-1)
    assert tl_plugins.active(tiny_model)["scale"].factor == 2.0
    assert torch.equal(tiny_model(tokens), out)
    tl_plugins.disable(tiny_model)


def test_enabled_context_manager_restores(tiny_model, tokens, scale_plugin):
    ref = tiny_model(tokens)
    with tl_plugins.enabled(tiny_model, "scale", factor=2.0) as cfg:
        assert cfg.factor == 2.0
        assert not torch.equal(tiny_model(tokens), ref)
    assert torch.equal(tiny_model(tokens), ref)
    assert tl_plugins.active(tiny_model) == {}
    tl_plugins.enable(tiny_model, "scale", factor=2.0)
    with tl_plugins.enabled(tiny_model, "scale", factor=5.0):
        pass
    assert tl_plugins.active(tiny_model)["scale"].factor == 2.0
    tl_plugins.disable(tiny_model)


def test_context_manager_restores_after_an_exception(tiny_model, tokens, scale_plugin):
    ref = tiny_model(tokens)
    with pytest.raises(RuntimeError):
        with tl_plugins.enabled(tiny_model, "scale", factor=2.0):
            raise RuntimeError("boom")
    assert torch.equal(tiny_model(tokens), ref)


@torch.no_grad()  # TransformerBridge cannot be deep-copied after a gradient-enabled forward (the library
# keeps the last attention pattern, a non-leaf tensor, on GPT-2's attention), with or without plugins
def test_deepcopy_of_enabled_model_is_independent(tiny_model, tokens, scale_plugin):
    ref = tiny_model(tokens)
    tl_plugins.enable(tiny_model, "scale", factor=2.0)
    scaled = tiny_model(tokens)
    clone = copy.deepcopy(tiny_model)
    assert torch.equal(clone(tokens), scaled)
    for method in _seam_methods(clone):
        assert getattr(clone.blocks[0].attn, method).__self__ is clone.blocks[0].attn, method
    tl_plugins.disable(clone, "scale")
    assert torch.equal(clone(tokens), ref)
    assert torch.equal(tiny_model(tokens), scaled)  # the original is still enabled
    tl_plugins.disable(tiny_model, "scale")


def test_unknown_plugin_lists_known(tiny_model, scale_plugin):
    with pytest.raises(UnknownPluginError, match=r"unknown plugin 'nope'.*scale"):
        tl_plugins.enable(tiny_model, "nope")


def test_unknown_option_names_accepted_ones(tiny_model, scale_plugin):
    with pytest.raises(TypeError, match=r"unknown option\(s\) fctor; accepted: factor"):
        tl_plugins.enable(tiny_model, "scale", fctor=2)
    assert tl_plugins.active(tiny_model) == {}


def test_not_a_transformerlens_model(scale_plugin):
    with pytest.raises(UnsupportedModelError, match="torch.nn.modules.linear.Linear"):
        tl_plugins.enable(torch.nn.Linear(2, 2), "scale")


def test_disable_not_enabled(tiny_model, scale_plugin):
    with pytest.raises(NotEnabledError, match="'scale' is not enabled"):
        tl_plugins.disable(tiny_model, "scale")


def test_failing_enable_leaves_model_unchanged(tiny_model, tokens, scale_plugin, temp_plugin):
    """A plugin whose enable hook raises after the seams were installed: everything is rolled back."""
    from dataclasses import dataclass

    from tl_plugins import hookimpl

    @dataclass
    class Cfg:
        pass

    class Broken:
        @staticmethod
        @hookimpl
        def tl_plugins_register(register):
            register("broken", config=Cfg, changes_forward=True, attention_seam=True, mlp_seam=True)

        @staticmethod
        @hookimpl
        def tl_plugins_enable(model, name, config, backend):
            if name == "broken":
                raise RuntimeError("refusing this model")

    ref = tiny_model(tokens)
    before = _fingerprint(tiny_model)  # after a plain forward, as above
    temp_plugin(Broken, "test-broken")
    with pytest.raises(RuntimeError, match="refusing"):
        tl_plugins.enable(tiny_model, "broken")
    assert torch.equal(tiny_model(tokens), ref)
    _same_fingerprint(before, _fingerprint(tiny_model))


def test_two_plugins_share_one_seam(tiny_model, tokens, scale_plugin, temp_plugin):
    """Disabling one of two seam users keeps the seam for the other."""
    from dataclasses import dataclass

    from tl_plugins import hookimpl

    @dataclass
    class Cfg:
        pass

    class Other:
        @staticmethod
        @hookimpl
        def tl_plugins_register(register):
            register("other", config=Cfg, changes_forward=True, attention_seam=True)

    temp_plugin(Other, "test-other")
    ref = tiny_model(tokens)
    tl_plugins.enable(tiny_model, "other")
    tl_plugins.enable(tiny_model, "scale", factor=2.0)
    tl_plugins.disable(tiny_model, "scale")
    methods = _seam_methods(tiny_model)
    assert all(m in tiny_model.blocks[0].attn.__dict__ for m in methods)
    assert torch.equal(tiny_model(tokens), ref)
    tl_plugins.disable(tiny_model, "other")
    assert not any(m in tiny_model.blocks[0].attn.__dict__ for m in methods)


def test_kv_cache_generation_through_the_seam_is_bit_exact(scale_plugin):
    model = tl_plugins.models.load("tiny-llama")
    prompt = torch.tensor([[3, 14, 15, 9, 2, 6]])
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False, use_past_kv_cache=True,
                           stop_at_eos=False)
    with tl_plugins.enabled(model, "scale", factor=1.0):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False, use_past_kv_cache=True,
                           stop_at_eos=False)
    assert torch.equal(out, ref)


def test_padded_batches_through_the_seam_are_bit_exact(scale_plugin):
    model = tl_plugins.models.load("tiny-llama")
    tokens = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding on the first row
    ref = model(tokens, attention_mask=mask)
    with tl_plugins.enabled(model, "scale", factor=1.0):
        assert torch.equal(model(tokens, attention_mask=mask), ref)


def test_enable_and_disable_go_to_the_owner_alone(tiny_model, temp_plugin):
    """Two plugins whose hooks do not look at the name: each is called only for its own name."""
    from dataclasses import dataclass

    from tl_plugins import hookimpl

    calls = []

    @dataclass
    class Cfg:
        pass

    def make(label):
        class P:
            @staticmethod
            @hookimpl
            def tl_plugins_register(register):
                register(label, config=Cfg)

            @staticmethod
            @hookimpl
            def tl_plugins_enable(model, name, config, backend):
                calls.append((label, "enable", name))
                return True

            @staticmethod
            @hookimpl
            def tl_plugins_disable(model, name, backend):
                calls.append((label, "disable", name))
                return True
        return P

    temp_plugin(make("owner-a"), "test-owner-a")
    temp_plugin(make("owner-b"), "test-owner-b")
    tl_plugins.enable(tiny_model, "owner-a")
    tl_plugins.enable(tiny_model, "owner-b")
    tl_plugins.disable(tiny_model, "owner-a")
    tl_plugins.disable(tiny_model, "owner-b")
    assert calls == [("owner-a", "enable", "owner-a"), ("owner-b", "enable", "owner-b"),
                     ("owner-a", "disable", "owner-a"), ("owner-b", "disable", "owner-b")]
