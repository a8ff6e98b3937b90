"""tl_plugins composed with SAELens on TransformerBridge: SAEs attached to an ``SAETransformerBridge``.

``SAETransformerBridge`` (sae-lens 6.x, transformer-lens 3.x) is a TransformerBridge subclass:
``SAETransformerBridge.boot_transformers`` boots a plain bridge and swaps its class. ``add_sae``
resolves the hook alias (``blocks.0.attn.hook_z`` -> ``blocks.0.attn.o.hook_in``,
``blocks.1.hook_resid_pre`` -> ``blocks.1.hook_in``), replaces that HookPoint module with an
``_SAEWrapper`` and turns the SAE's hook_z reshaping off (bridge hook_z is flat); ``reset_saes``
puts a fresh HookPoint back. The host's bridge seam is per-instance ``forward`` /
``_reconstruct_attention`` / ``_update_kv_cache`` methods that look the hook points up at call time,
so an attached SAE must keep firing whatever the order of ``add_sae`` / ``enable`` / ``disable`` /
``reset_saes``, and every teardown must leave the bridge bit-identical to what it was.

Plugins (the bridge is booted offline from a tiny random GPT-2 (joint QKV) or Llama (GQA, rotary)):

    passthrough  declares attention and MLP seams, changes nothing: with SAEs bit-equal to the
                 SAEs alone
    topk-dense   ``topk`` at k = 10**9 >= n: bit-equal to no plugin, SAEs attached in both
    topk         k = 2 on 12-token prompts (really sparse): equal (<= 1e-5) to no plugin with a
                 plain hook on every ``hook_attn_scores`` keeping each row's 2 largest scores,
                 the SAEs attached in both
    embedspace   changes no forward: outputs bit-equal to the SAEs alone; its vocabulary-space
                 reads (copying scores, an OV matrix) are the same with and without SAEs
    iclgd        changes no forward: outputs bit-equal to the SAEs alone

No hub: the models come from ``tl_plugins.models.tiny.hf_model`` with the offline word-level
tokenizer, the SAEs from ``StandardSAEConfig`` with random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import warnings

import pytest
import torch

import tl_plugins
from tl_plugins import hookimpl
from tl_plugins.models.tiny import hf_model, word_tokenizer

sae_lens = pytest.importorskip(
    "sae_lens", reason="sae-lens is not installed (the TL 4.x leg has none: sae-lens pins transformer-lens<4)")
SAETransformerBridge = getattr(sae_lens, "SAETransformerBridge", None)
if SAETransformerBridge is None:
    pytest.skip(f"sae-lens {getattr(sae_lens, '__version__', '?')} exports no SAETransformerBridge "
                "(it needs transformer-lens >= 3 with TransformerBridge)", allow_module_level=True)
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

pytestmark = pytest.mark.slow  # ~50 tiny bridges booted and torn down; about a minute on 2 cores

PASSTHROUGH = "saelens-bridge-passthrough"
TOPK_K = 2
DENSE_K = 10**9
Z_HOOK = "blocks.0.attn.hook_z"
RESID_HOOK = "blocks.1.hook_resid_pre"
# the queries of layer 1 (flat [batch, pos, n_heads * d_head] on the bridge): the seam reads the
# rotated queries off the library's frame, so an SAE here must reach the plugin's attention too
Q_HOOK = "blocks.1.attn.hook_q"
SAE_HOOKS = {Z_HOOK, RESID_HOOK, Q_HOOK}
ARCHS = ("gpt2", "llama")
# name -> (plugin, enable options); "exact": the oracle is bit-equal
PLUGINS = {
    "passthrough": (PASSTHROUGH, {}),
    "topk-dense": ("topk", {"k": DENSE_K}),
    "topk": ("topk", {"k": TOPK_K}),
    "embedspace": ("embedspace", {}),
    "iclgd": ("iclgd", {}),
}
CHANGES_FORWARD = {"topk"}


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


_UNAVAILABLE: dict = {}


def _unavailable(key: str):
    """Why plugin ``key`` cannot be enabled on an SAETransformerBridge now (None when it can)."""
    from tl_plugins.plugins import registry

    if key not in _UNAVAILABLE:
        name, options = PLUGINS[key]
        reason = None
        if name not in registry():
            reason = f"{name!r} is not in the tl_plugins registry"
        else:
            try:
                model = _sae_bridge("gpt2")
                tl_plugins.enable(model, name, **options)
                tl_plugins.disable(model, name)
            except Exception as exc:  # noqa: BLE001 - any failure means not usable yet
                reason = f"tl_plugins.enable(SAETransformerBridge, {name!r}, **{options}) fails: " \
                         f"{type(exc).__name__}: {exc}"
        _UNAVAILABLE[key] = reason
    return _UNAVAILABLE[key]


@pytest.fixture(params=list(PLUGINS))
def plugin(request):
    """(key, plugin name, enable options)"""
    reason = _unavailable(request.param)
    if reason:
        pytest.skip(reason)
    name, options = PLUGINS[request.param]
    return request.param, name, options


# ------------------------------------------------------------------------------------------------
# models, SAEs, helpers
# ------------------------------------------------------------------------------------------------


def _sae_bridge(arch: str):
    """An SAETransformerBridge booted offline, with SAELens's own boot (a fresh copy each call)."""
    hf = hf_model(arch, seed=0)
    tok = word_tokenizer(hf.config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="tl-plugins-sae-bridge-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.config.save_pretrained(folder)
        tok.save_pretrained(folder)
        model = SAETransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, device="cpu",
                                                       dtype=torch.float32)
    assert type(model) is SAETransformerBridge
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
        q = StandardSAE(StandardSAEConfig(
            d_in=cfg.n_heads * cfg.d_head, d_sae=96, metadata=SAEMetadata(hook_name=Q_HOOK)))
        for sae in (z, resid, q):  # a non-zero encoder bias, so reconstructions are not degenerate
            torch.nn.init.normal_(sae.b_enc, std=0.1)
    return [z, resid, q]


def _tokens(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(4, model.cfg.d_vocab, (2, 12), generator=gen)


def _attach(model, saes) -> None:
    for sae in saes:
        model.add_sae(sae)
    assert set(model.acts_to_saes) == SAE_HOOKS, "add_sae skipped an SAE (hook not found)"


def _keep_top_k(scores: torch.Tensor, hook) -> torch.Tensor:
    """Oracle of topk: each row keeps its k largest (masked) scores, the rest are masked out."""
    kth = scores.topk(TOPK_K, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, torch.finfo(scores.dtype).min)


def _topk_by_hook(model, tokens) -> torch.Tensor:
    return model.run_with_hooks(
        tokens, fwd_hooks=[(lambda name: name.endswith("attn.hook_attn_scores"), _keep_top_k)])


# instance slots the bridge seams take over (attention catch / throw points, HF activations)
_SLOT_KEYS = ("forward", "_reconstruct_attention", "_update_kv_cache", "act", "act_fn",
              "activation_fn", "activation")


def _seam_slots(model) -> dict:
    slots = {}
    for name, module in model.named_modules():
        for key in _SLOT_KEYS:
            if key in module.__dict__:
                value = module.__dict__[key]
                slots[(name, key)] = (type(value).__name__, getattr(value, "__func__", None))
    return slots


_FRESH_SLOTS: dict = {}


def _leftovers(model, arch: str) -> list[str]:
    """Everything tl_plugins could have left on the bridge (there must be nothing once disabled)."""
    if arch not in _FRESH_SLOTS:
        _FRESH_SLOTS[arch] = _seam_slots(_sae_bridge(arch))
    found = [f"{name}.{k}" for name, module in model.named_modules() for k in module.__dict__
             if k.startswith("_tl_plugins")]
    found += [k for k in model.__dict__ if k.startswith("_tl_plugins")]
    now, fresh = _seam_slots(model), _FRESH_SLOTS[arch]
    found += [f"{n}.{k}: {now.get((n, k))} (fresh bridge: {fresh.get((n, k))})"
              for (n, k) in set(now) | set(fresh) if now.get((n, k)) != fresh.get((n, k))]
    return found


def _sae_acts(model, cache) -> dict[str, torch.Tensor]:
    return {sae_name: cache[model.get_sae_hook_name(sae)]
            for sae_name, sae in model.acts_to_saes.items()}


@dataclasses.dataclass
class _References:
    base: torch.Tensor  # no SAE, no plugin
    sae_only: torch.Tensor  # SAEs, no plugin
    plugin_only: torch.Tensor  # plugin, no SAE
    plugin_sae: torch.Tensor  # oracle of plugin + SAEs


_REFS: dict = {}


def _references(arch: str, key: str) -> _References:
    if (arch, key) not in _REFS:
        _REFS[(arch, key)] = _compute_references(arch, key)
    return _REFS[(arch, key)]


def _compute_references(arch: str, key: str) -> _References:
    """The oracles, computed without the plugin (the SAEs attached where they belong)."""
    model = _sae_bridge(arch)
    saes = _saes(model)
    tokens = _tokens(model)
    with torch.no_grad():
        base = model(tokens)
        plugin_only = _topk_by_hook(model, tokens) if key == "topk" else base
        _attach(model, saes)
        sae_only = model(tokens)
        plugin_sae = _topk_by_hook(model, tokens) if key == "topk" else sae_only
    return _References(base, sae_only, plugin_only, plugin_sae)


def _check(out: torch.Tensor, expected: torch.Tensor, key: str) -> None:
    if key in CHANGES_FORWARD:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out, expected), f"{key}: outputs differ from the oracle (max " \
                                          f"{(out - expected).abs().max().item():.3g})"


def _check_plugin_sae_output(out: torch.Tensor, refs: _References, key: str) -> None:
    _check(out, refs.plugin_sae, key)
    if key in CHANGES_FORWARD:  # top-k is really active under the SAE: sparse attention changes it
        assert (out - refs.sae_only).abs().max() > 1e-3


def _setup(plugin, arch):
    key, name, options = plugin
    refs = _references(arch, key)
    model = _sae_bridge(arch)
    return key, name, options, refs, model, _tokens(model)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_references_are_discriminating(arch):
    """The SAEs change the output and top-k changes it too, so both claims are checkable; the
    SAEs sit where the seam looks: the flat hook_z is the output projection's input."""
    refs = _references(arch, "topk")
    assert (refs.sae_only - refs.base).abs().max() > 1e-2
    assert (refs.plugin_only - refs.base).abs().max() > 1e-3
    assert (refs.plugin_sae - refs.sae_only).abs().max() > 1e-3
    model = _sae_bridge(arch)
    tokens = _tokens(model)
    with torch.no_grad():  # the query SAE alone changes the output (it is checkable on its own)
        model.add_sae(_saes(model)[2])
        assert (model(tokens) - refs.base).abs().max() > 1e-3
        model.reset_saes()
    _attach(model, _saes(model))
    assert model._resolve_hook_name(Z_HOOK) == "blocks.0.attn.o.hook_in"
    assert type(model.blocks[0].attn.o.hook_in).__name__ == "_SAEWrapper"
    assert type(model.blocks[1].attn.q.hook_out).__name__ == "_SAEWrapper"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("order", ["sae_then_enable", "enable_then_sae"])
@pytest.mark.parametrize("teardown", ["disable_then_reset", "reset_then_disable"])
def test_sae_fires_with_plugin_and_teardown_restores(plugin, arch, order, teardown):
    key, name, options, refs, model, tokens = _setup(plugin, arch)
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
        acts = _sae_acts(model, cache)
        assert set(acts) == SAE_HOOKS
        assert all(a.abs().sum() > 0 for a in acts.values()), "an attached SAE did not fire"
        # run_with_cache hooks every point (scores and pattern included): topk's hooked route
        _check_plugin_sae_output(out, refs, key)
        _check_plugin_sae_output(model(tokens), refs, key)  # and its unhooked route

        if teardown == "disable_then_reset":
            tl_plugins.disable(model, name)
            out, cache = model.run_with_cache(tokens)
            assert torch.equal(out, model(tokens))
            assert torch.equal(out, refs.sae_only), "disabling did not restore the SAE-only outputs"
            assert set(_sae_acts(model, cache)) == SAE_HOOKS
            model.reset_saes()
        else:
            model.reset_saes()
            _check(model(tokens), refs.plugin_only, key)
            tl_plugins.disable(model, name)
        assert torch.equal(model(tokens), refs.base)
        assert not model.acts_to_saes
        assert type(model.blocks[0].attn.o.hook_in).__name__ == "HookPoint"
        assert all(sae.hook_z_reshaping_mode for sae in saes[:1]), "reset_saes did not restore reshaping"
        assert tl_plugins.active(model) == {}
        assert not _leftovers(model, arch), _leftovers(model, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_enable_disable_cycles_with_sae_attached(plugin, arch):
    """Reconfigure and re-enable with the SAEs on; each disable gives the SAE-only outputs back."""
    key, name, options, refs, model, tokens = _setup(plugin, arch)
    _attach(model, _saes(model))
    with torch.no_grad():
        for _ in range(2):
            tl_plugins.enable(model, name, **options)
            tl_plugins.enable(model, name, **options)  # reconfigure in place
            _check_plugin_sae_output(model(tokens), refs, key)
            tl_plugins.disable(model, name)
            assert torch.equal(model(tokens), refs.sae_only)
        with tl_plugins.enabled(model, name, **options):
            _check_plugin_sae_output(model(tokens), refs, key)
        assert torch.equal(model(tokens), refs.sae_only)
        model.reset_saes()
        assert torch.equal(model(tokens), refs.base)
    assert not _leftovers(model, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_run_with_saes_context_under_the_plugin(arch):
    """SAELens's temporary attachment (``run_with_saes``, ``saes()``) with top-k enabled."""
    if _unavailable("topk"):
        pytest.skip(_unavailable("topk"))
    refs = _references(arch, "topk")
    model = _sae_bridge(arch)
    tokens = _tokens(model)
    with torch.no_grad():
        tl_plugins.enable(model, "topk", k=TOPK_K)
        out = model.run_with_saes(tokens, saes=_saes(model))
        _check_plugin_sae_output(out, refs, "topk")
        assert not model.acts_to_saes, "run_with_saes left an SAE attached"
        _check(model(tokens), refs.plugin_only, "topk")
        with model.saes(saes=_saes(model)):
            _check_plugin_sae_output(model(tokens), refs, "topk")
        tl_plugins.disable(model, "topk")
        assert torch.equal(model(tokens), refs.base)
    assert not _leftovers(model, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_embedspace_reads_the_same_weights_with_saes_attached(arch):
    """The SAE wrappers replace hook points only: every vocabulary-space read is unchanged."""
    if _unavailable("embedspace"):
        pytest.skip(_unavailable("embedspace"))
    from tl_embedspace.config import space_for

    model = _sae_bridge(arch)
    with torch.no_grad():
        tl_plugins.enable(model, "embedspace")
        before = space_for(model)
        copying, ov = before.copying_scores(), before.ov(1, 0).diag()
        _attach(model, _saes(model))
        after = space_for(model)
        assert torch.equal(after.copying_scores(), copying)
        assert torch.equal(after.ov(1, 0).diag(), ov)
        model.reset_saes()
        tl_plugins.disable(model, "embedspace")
    assert not _leftovers(model, arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", ["passthrough", "topk"])  # the plugins that install seams
def test_deepcopy_of_enabled_sae_bridge_is_independent(key, arch):
    if _unavailable(key):
        pytest.skip(_unavailable(key))
    key, name, options, refs, model, tokens = _setup((key, *PLUGINS[key]), arch)
    _attach(model, _saes(model))
    tl_plugins.enable(model, name, **options)
    with torch.no_grad():
        original_out = model(tokens)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(tokens), original_out)
        _, cache = twin.run_with_cache(tokens)
        assert all(a.abs().sum() > 0 for a in _sae_acts(twin, cache).values())
        assert tl_plugins.active(twin).keys() == {name}

        # the copy's SAEs and seams are its own
        twin.acts_to_saes[RESID_HOOK].W_dec.mul_(0.0)
        assert torch.equal(model(tokens), original_out)
        assert not torch.equal(twin(tokens), original_out)

        tl_plugins.disable(twin, name)
        assert tl_plugins.active(model).keys() == {name}, "disabling the copy disabled the original"
        assert torch.equal(model(tokens), original_out)
        assert not _leftovers(twin, arch), _leftovers(twin, arch)
        twin.reset_saes()
        assert not twin.acts_to_saes and set(model.acts_to_saes) == SAE_HOOKS

        _check_plugin_sae_output(model(tokens), refs, key)
        tl_plugins.disable(model, name)
        assert torch.equal(model(tokens), refs.sae_only)
        model.reset_saes()
        assert torch.equal(model(tokens), refs.base)
    assert not _leftovers(model, arch)
