"""tl_plugins composed with SAELens: SAEs attached to a HookedSAETransformer with a seam plugin on.

SAELens attaches an SAE by replacing the hook-point module; the host's seams are per-instance
methods that look hook points up at call time, so an attached SAE must keep firing whatever the
order of ``add_sae`` / ``enable`` / ``disable`` / ``reset_saes``, and every teardown must leave the
model bit-identical to what it was. Plugins:

    passthrough  declares attention and MLP seams, changes nothing: with an SAE its outputs are
                 bit-equal to the SAE without any plugin
    topk         k = 2 on 12-token prompts (really sparse): the oracle is the same plugin on a
                 model without attached SAEs, the SAEs applied through plain TransformerLens hooks

No hub: the model is built from a HookedTransformerConfig, the SAEs from StandardSAEConfig with
random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import tl_plugins
from tl_plugins import hookimpl

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformerConfig

from tl_plugins.models.tiny import TINY_GPT2, TINY_LLAMA

pytestmark = pytest.mark.slow  # ~25 small models built and torn down; a few seconds each on 2 cores

PASSTHROUGH = "saelens-passthrough"
TOPK_K = 2
Z_HOOK = "blocks.0.attn.hook_z"
RESID_HOOK = "blocks.1.hook_resid_pre"
ARCHS = {"gpt2": TINY_GPT2, "llama": TINY_LLAMA}


# ------------------------------------------------------------------------------------------------
# the pass-through plugin and the plugin parameters
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _NoOptions:
    pass


class _PassthroughPlugin:
    """Declares both seams and implements no attention/activation hook: the host computes all."""

    @hookimpl
    def tl_plugins_register(self, register):
        register(PASSTHROUGH, config=_NoOptions, summary="test: seams only", changes_forward=False,
                 attention_seam=True, mlp_seam=True)


@pytest.fixture(scope="module", autouse=True)
def _passthrough_registered():
    plugin = _PassthroughPlugin()
    tl_plugins.register_plugin(plugin, name=PASSTHROUGH)
    yield
    tl_plugins.unregister_plugin(plugin)


def _topk_unavailable():
    from tl_plugins.plugins import registry

    if "topk" not in registry():
        return '"topk" is not in the tl_plugins registry'
    try:
        model = tl_plugins.models.load("tiny-gpt2")
        tl_plugins.enable(model, "topk", k=TOPK_K)
        tl_plugins.disable(model, "topk")
    except Exception as exc:  # noqa: BLE001 - any failure means not usable yet
        return f'tl_plugins.enable(model, "topk", k={TOPK_K}) fails: {type(exc).__name__}: {exc}'
    return None


@pytest.fixture(params=["passthrough", "topk"])
def plugin(request):
    """(name, enable options)"""
    if request.param == "topk":
        reason = _topk_unavailable()
        if reason:
            pytest.skip(reason)
        return "topk", {"k": TOPK_K}
    return PASSTHROUGH, {}


# ------------------------------------------------------------------------------------------------
# models, SAEs, helpers
# ------------------------------------------------------------------------------------------------


def _sae_model(arch: str) -> HookedSAETransformer:
    fields = ARCHS[arch]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedSAETransformer(HookedTransformerConfig(seed=0, **fields))
    return model.eval()


def _saes(model) -> list[StandardSAE]:
    cfg = model.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        z = StandardSAE(StandardSAEConfig(
            d_in=cfg.n_heads * cfg.d_head, d_sae=96, reshape_activations="hook_z",
            metadata=SAEMetadata(hook_name=Z_HOOK)))
        resid = StandardSAE(StandardSAEConfig(
            d_in=cfg.d_model, d_sae=128, metadata=SAEMetadata(hook_name=RESID_HOOK)))
        for sae in (z, resid):  # a non-zero encoder bias, so reconstructions are not degenerate
            torch.nn.init.normal_(sae.b_enc, std=0.1)
    return [z, resid]


def _tokens(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, model.cfg.d_vocab, (2, 12), generator=gen)


def _attach(model, saes) -> None:
    for sae in saes:
        model.add_sae(sae)


def _seam_slots(model) -> dict:
    """The per-instance slots a seam may take over: ``forward`` and ``act_fn`` of every module.

    A fresh HookedSAETransformer already has instance ``forward`` attributes on its MLPs, so
    teardown is checked against a snapshot of the untouched model, compared by function.
    """
    slots = {}
    for name, module in model.named_modules():
        for key in ("forward", "act_fn"):
            if key in module.__dict__:
                value = module.__dict__[key]
                slots[(name, key)] = (type(value).__name__, getattr(value, "__func__", None))
    return slots


_FRESH_SLOTS: dict = {}


def _leftovers(model) -> list[str]:
    """Everything tl_plugins could have left on the model (there must be nothing once disabled)."""
    arch = "llama" if model.cfg.gated_mlp else "gpt2"
    if arch not in _FRESH_SLOTS:
        _FRESH_SLOTS[arch] = _seam_slots(_sae_model(arch))
    found = [f"{name}.{k}" for name, module in model.named_modules() for k in module.__dict__
             if k.startswith("_tl_plugins")]
    now, fresh = _seam_slots(model), _FRESH_SLOTS[arch]
    found += [f"{n}.{k}: {now.get((n, k))} (fresh model: {fresh.get((n, k))})"
              for (n, k) in set(now) | set(fresh) if now.get((n, k)) != fresh.get((n, k))]
    return found


def _sae_acts(cache) -> dict[str, torch.Tensor]:
    return {h: cache[f"{h}.hook_sae_acts_post"] for h in (Z_HOOK, RESID_HOOK)}


def _sae_by_hooks(model, saes, tokens) -> torch.Tensor:
    """Oracle: the SAEs applied through plain TransformerLens forward hooks (no SAELens wrapper)."""
    hooks = [(sae.cfg.metadata.hook_name, lambda x, hook, sae=sae: sae.decode(sae.encode(x)))
             for sae in saes]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@dataclasses.dataclass
class _References:
    base: torch.Tensor  # no SAE, no plugin
    sae_only: torch.Tensor  # SAEs, no plugin
    plugin_only: torch.Tensor  # plugin, no SAE
    plugin_sae: torch.Tensor  # oracle of plugin + SAEs


_REFS: dict = {}


def _references(arch, name, options) -> _References:
    key = (arch, name, tuple(sorted(options.items())))
    if key not in _REFS:
        _REFS[key] = _compute_references(arch, name, options)
    return _REFS[key]


def _compute_references(arch, name, options) -> _References:
    model = _sae_model(arch)
    saes = _saes(model)
    tokens = _tokens(model)
    with torch.no_grad():
        base = model(tokens)
        sae_only = _sae_by_hooks(model, saes, tokens)
        tl_plugins.enable(model, name, **options)
        plugin_only = model(tokens)
        plugin_sae = _sae_by_hooks(model, saes, tokens)
        tl_plugins.disable(model, name)
    return _References(base, sae_only, plugin_only, plugin_sae)


def _check_plugin_sae_output(out, refs, name):
    if name == PASSTHROUGH:
        assert torch.equal(out, refs.sae_only), "pass-through + SAE differs from the SAE alone"
    else:
        torch.testing.assert_close(out, refs.plugin_sae, atol=1e-5, rtol=1e-5)
        # the plugin is really active under the SAE: sparse attention changes the output
        assert (out - refs.sae_only).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_references_are_discriminating():
    """The SAEs change the output, so 'the SAE still fires' is a checkable claim."""
    refs = _references("gpt2", PASSTHROUGH, {})
    assert (refs.sae_only - refs.base).abs().max() > 1e-2
    assert torch.equal(refs.plugin_only, refs.base)  # pass-through changes nothing


def _setup(plugin, arch):
    """(name, options, reference outputs, a fresh SAE-capable model, tokens) for one plugin/arch."""
    name, options = plugin
    refs = _references(arch, name, options)
    model = _sae_model(arch)
    return name, options, refs, model, _tokens(model)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("order", ["sae_then_enable", "enable_then_sae"])
@pytest.mark.parametrize("teardown", ["disable_then_reset", "reset_then_disable"])
def test_sae_fires_with_plugin_and_teardown_restores(plugin, arch, order, teardown):
    name, options, refs, model, tokens = _setup(plugin, arch)
    saes = _saes(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), refs.base)
        if order == "sae_then_enable":
            _attach(model, saes)
            tl_plugins.enable(model, name, **options)
        else:
            tl_plugins.enable(model, name, **options)
            _attach(model, saes)
        out, cache = model.run_with_cache(tokens)
        acts = _sae_acts(cache)
        assert all(a.abs().sum() > 0 for a in acts.values()), "an attached SAE did not fire"
        _check_plugin_sae_output(out, refs, name)

        if teardown == "disable_then_reset":
            tl_plugins.disable(model, name)
            out, cache = model.run_with_cache(tokens)
            assert torch.equal(out, model(tokens))
            assert torch.equal(out, refs.sae_only), "disabling did not restore the SAE-only outputs"
            assert set(_sae_acts(cache)) == {Z_HOOK, RESID_HOOK}
            model.reset_saes()
        else:
            model.reset_saes()
            if name == PASSTHROUGH:
                assert torch.equal(model(tokens), refs.plugin_only)
            else:
                torch.testing.assert_close(model(tokens), refs.plugin_only, atol=1e-5, rtol=1e-5)
            tl_plugins.disable(model, name)
        assert torch.equal(model(tokens), refs.base)
        assert not model.acts_to_saes
        assert tl_plugins.active(model) == {}
        assert not _leftovers(model), _leftovers(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_enable_disable_cycles_with_sae_attached(plugin, arch):
    """Reconfigure and re-enable with the SAE on; each disable gives the SAE-only outputs back."""
    name, options, refs, model, tokens = _setup(plugin, arch)
    _attach(model, _saes(model))
    with torch.no_grad():
        for _ in range(2):
            tl_plugins.enable(model, name, **options)
            tl_plugins.enable(model, name, **options)  # reconfigure in place
            _check_plugin_sae_output(model(tokens), refs, name)
            tl_plugins.disable(model, name)
            assert torch.equal(model(tokens), refs.sae_only)
        with tl_plugins.enabled(model, name, **options):
            _check_plugin_sae_output(model(tokens), refs, name)
        assert torch.equal(model(tokens), refs.sae_only)
        model.reset_saes()
        assert torch.equal(model(tokens), refs.base)
    assert not _leftovers(model)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_deepcopy_of_enabled_sae_model_is_independent(plugin, arch):
    name, options, refs, model, tokens = _setup(plugin, arch)
    _attach(model, _saes(model))
    tl_plugins.enable(model, name, **options)
    with torch.no_grad():
        original_out = model(tokens)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(tokens), original_out)
        _, cache = twin.run_with_cache(tokens)
        assert all(a.abs().sum() > 0 for a in _sae_acts(cache).values())
        assert tl_plugins.active(twin).keys() == {name}

        # the copy's SAEs and seams are its own
        twin.acts_to_saes[RESID_HOOK].W_dec.mul_(0.0)
        assert torch.equal(model(tokens), original_out)
        twin_out_edited = twin(tokens)
        assert not torch.equal(twin_out_edited, original_out)

        tl_plugins.disable(twin, name)
        assert tl_plugins.active(model).keys() == {name}, "disabling the copy disabled the original"
        assert torch.equal(model(tokens), original_out)
        assert not _leftovers(twin), _leftovers(twin)
        twin.reset_saes()
        assert not twin.acts_to_saes and set(model.acts_to_saes) == {Z_HOOK, RESID_HOOK}

        _check_plugin_sae_output(model(tokens), refs, name)
        tl_plugins.disable(model, name)
        assert torch.equal(model(tokens), refs.sae_only)
        model.reset_saes()
        assert torch.equal(model(tokens), refs.base)
    assert not _leftovers(model)
