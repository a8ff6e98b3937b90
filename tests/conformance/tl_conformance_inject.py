"""Pytest plugin injected into TransformerLens's own test-suite by the conformance harness.

Loaded with ``-p tl_conformance_inject`` in a subprocess whose working directory is the unpacked
TransformerLens source distribution. It does four things:

1. Enables a tl_plugins plugin on every model the TL tests build. ``HookedTransformer.__init__``
   (and ``HookedSAETransformer.__init__``) are wrapped so that, when the outermost constructor
   returns, ``tl_plugins.enable(model, NAME, **CONFIG)`` runs. Attention modules the tests build
   on their own (``Attention(cfg)``, ``GroupedQueryAttention(cfg)``, outside any model) get the
   same plugin through a one-block HookedTransformer shell that owns them, so the public
   ``tl_plugins.enable`` path is used there too.
2. Replaces ``HookedTransformer.from_pretrained`` with an offline loader: the few hub names the
   selected tests ask for become small random models of the same architecture family, seeded,
   weights processed as from_pretrained does, with a byte-level BPE tokenizer trained on the
   selected test files (GPT-2 style: BOS = EOS = PAD). The baseline run uses the same loader, so
   with and without the plugin the tests see identical models.
3. Counts calls through the host's seams (a pass-through wrapper hookimpl), so a run shows the
   plugin's code path was really taken.
4. Writes a JSON report (every test's outcome, failure text, enables and refusals per test, seam
   calls) to ``$TL_CONFORMANCE_REPORT`` at the end of the session.

With ``TL_CONFORMANCE_SUITE=bridge`` it does the same for TransformerBridge instead (the TL
4.x / 3.x bridge tests): ``TransformerBridge.__init__`` and ``boot_transformers`` are wrapped so
every bridge gets the plugin once it is built; a bare attention bridge a test wires by hand
(``set_original_component`` / ``add_module("_original_component", ...)`` outside any bridge
construction) gets it through a one-block TransformerBridge shell; and
``boot_transformers("gpt2" | "distilgpt2" | ...)`` boots an offline random GPT-2 of the same
architecture and depth (see ``OFFLINE_BRIDGE_MODELS``).

Environment:
    TL_CONFORMANCE_SUITE           "hooked" (default) or "bridge": which model class gets the plugin
    TL_CONFORMANCE_PLUGIN          plugin name to enable ("" or unset: baseline, enable nothing)
    TL_CONFORMANCE_CONFIG          JSON object of enable() keyword options; the string "$d_mlp"
                                   as a value is replaced by the model's cfg.d_mlp
    TL_CONFORMANCE_PLUGIN_MODULE   module to import and register by hand first (the built-in
                                   pass-through plugin lives in tests/conformance)
    TL_CONFORMANCE_REPORT          where to write the JSON report
    TL_CONFORMANCE_TOKENIZER_DIR   folder for the trained tokenizers (built once per corpus)
    TL_CONFORMANCE_CYCLE           "1": disable right after enabling (checks what disable leaves)
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import threading
import time
import traceback
import types
import warnings
from pathlib import Path

import pytest
import torch

_PLUGIN = os.environ.get("TL_CONFORMANCE_PLUGIN", "").strip()
_SUITE = os.environ.get("TL_CONFORMANCE_SUITE", "").strip() or "hooked"
# "1": disable right after enabling (the TL tests then check that nothing was left behind)
_CYCLE = os.environ.get("TL_CONFORMANCE_CYCLE", "") == "1"
_CONFIG = json.loads(os.environ.get("TL_CONFORMANCE_CONFIG", "") or "{}")

_local = threading.local()
_current_test = "<collection>"
_record: dict = {
    "plugin": _PLUGIN,
    "config": _CONFIG,
    "model_enables": 0,
    "module_enables": 0,
    "refused": [],
    "enables_per_test": {},
    "attention_calls": 0,  # calls that went through the attention seam (any plugin)
    "attention_calls_per_test": {},
    "mlp_activation_calls": 0,
    "cycle_leftovers": [],
    "suite": _SUITE,
    # bridge suite: bare attention bridges left alone because the seam has no family for them
    "bare_unsupported": {},
    "outcomes": {},
    "longrepr": {},
    "durations": {},
}


# ------------------------------------------------------------------------------------------------
# Enabling
# ------------------------------------------------------------------------------------------------


def _config_for(cfg) -> dict:
    out = {}
    no_mlp = getattr(cfg, "attn_only", False) or not getattr(cfg, "d_mlp", None)
    for key, value in _CONFIG.items():
        if key == "ff_k" and no_mlp:
            continue  # attention-only models have no MLP to configure
        if value == "$d_mlp":
            value = int(cfg.d_mlp)
        out[key] = value
    return out


def _count(kind: str) -> None:
    _record[kind] += 1
    per = _record["enables_per_test"]
    per[_current_test] = per.get(_current_test, 0) + 1


def _modules_of(model) -> list:
    blocks = model.__dict__.get("blocks")
    if isinstance(blocks, list):  # a shell around a bare attention module
        return [("blocks.0.attn", b.attn) for b in blocks]
    return list(model.named_modules())


# instance slots the seams take over: HookedTransformer (forward, act_fn) and TransformerBridge
# (forward or _reconstruct_attention as catch point, _update_kv_cache as throw point, the wrapped
# Hugging Face module's activation)
_SLOT_KEYS = ("forward", "act_fn", "_reconstruct_attention", "_update_kv_cache", "act",
              "activation_fn", "activation")


def _slots(model) -> dict:
    """The instance slots a seam takes over (``forward``, ``act_fn``) and what fills them."""
    out = {}
    for name, module in _modules_of(model):
        for key in _SLOT_KEYS:
            if key in module.__dict__:
                value = module.__dict__[key]
                out[f"{name}.{key}"] = (type(value).__name__, id(getattr(value, "__func__", value)))
    return out


def _traces(model, before: dict) -> list[str]:
    """What a refused enable left on the model (the host contract: nothing)."""
    found = [k for k in model.__dict__ if k.startswith("_tl_plugins")]
    for name, module in _modules_of(model):
        found += [f"{name}.{k}" for k in module.__dict__ if k.startswith("_tl_plugins")]
    after = _slots(model)
    found += [f"{k}: {after.get(k)} (before: {before.get(k)})"
              for k in set(after) | set(before) if after.get(k) != before.get(k)]
    return found


def _enable(model, kind: str) -> None:
    import tl_plugins

    before = _slots(model)
    try:
        tl_plugins.enable(model, _PLUGIN, **_config_for(model.cfg))
    except Exception as exc:  # noqa: BLE001 - a refusal may be any exception (host contract)
        # A plugin may refuse a model (the host contract: raise, and the model is left as it was),
        # e.g. an attention variant the seam does not reproduce. The test then runs on the plain
        # model; the refusal is listed and the conformance tests check it was an expected one.
        _record["refused"].append({
            "test": _current_test, "kind": kind, "error": type(exc).__name__,
            "reason": str(exc)[:500], "left_behind": _traces(model, before),
        })
        return
    _count(kind)
    if _CYCLE:
        tl_plugins.disable(model, _PLUGIN)
        left = _traces(model, before)
        if left:
            _record["cycle_leftovers"].append({"test": _current_test, "left_behind": left})


class _SeamCounter:
    """Counts calls through the seams, so a run shows the plugin's code path was really taken."""

    def __init__(self):
        from tl_plugins import hookimpl

        @hookimpl(wrapper=True)
        def tl_plugins_attention(call):
            _record["attention_calls"] += 1
            per = _record["attention_calls_per_test"]
            per[_current_test] = per.get(_current_test, 0) + 1
            return (yield)

        @hookimpl(wrapper=True)
        def tl_plugins_mlp_activation(call):
            _record["mlp_activation_calls"] += 1
            return (yield)

        self.tl_plugins_attention = tl_plugins_attention
        self.tl_plugins_mlp_activation = tl_plugins_mlp_activation


def _depth() -> int:
    return getattr(_local, "depth", 0)


def _wrap_init(cls, after, *, nest: bool) -> None:
    """Wrap ``cls.__init__`` (once) so that ``after(instance)`` runs when an outermost construction
    finishes with a plugin selected. ``nest``: count this class's constructions as nesting depth
    (a model builds attention modules inside its own __init__; those must not be enabled apart)."""
    original = cls.__init__
    if getattr(original, "_tl_conformance", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if nest:
            _local.depth = _depth() + 1
        try:
            original(self, *args, **kwargs)
        finally:
            if nest:
                _local.depth -= 1
        if _depth() == 0 and _PLUGIN:
            after(self)

    __init__._tl_conformance = True
    cls.__init__ = __init__


def _enable_model(model) -> None:
    _enable(model, "model_enables")


def _shell_for(attn):
    """A HookedTransformer instance whose only block holds ``attn`` (no other state)."""
    from transformer_lens import HookedTransformer

    shell = HookedTransformer.__new__(HookedTransformer)
    torch.nn.Module.__init__(shell)
    object.__setattr__(shell, "cfg", attn.cfg)
    object.__setattr__(shell, "blocks", [types.SimpleNamespace(attn=attn)])
    return shell


def _enable_bare_attention(attn) -> None:
    shell = _shell_for(attn)
    # the seam's bookkeeping lives on the shell; keep it alive as long as the module
    object.__setattr__(attn, "_tl_conformance_shell", shell)
    _enable(shell, "module_enables")


# ------------------------------------------------------------------------------------------------
# The offline from_pretrained
# ------------------------------------------------------------------------------------------------

_COMMON = dict(d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=256, normalization_type="LN")

# name -> config fields; small random stand-ins of the hub models the selected tests load, narrow
# (d_model 64) but with the layer and head counts the tests index (blocks.6, 8 heads of solu-2l)
OFFLINE_MODELS = {
    "solu-1l": dict(_COMMON, n_layers=1, n_heads=8, d_head=8, act_fn="solu_ln",
                    positional_embedding_type="standard"),
    "gpt2-small": dict(
        _COMMON, n_layers=12, act_fn="gelu_new", positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
    ),
    "pythia-14m": dict(
        _COMMON, n_layers=4, act_fn="gelu", positional_embedding_type="rotary", rotary_dim=4,
        parallel_attn_mlp=True, original_architecture="GPTNeoXForCausalLM",
    ),
    # GPT-Neo: alternating global/local attention, no 1/sqrt(d_head) scale; a short window so the
    # local layers really mask something on the tests' short prompts
    "tiny-stories-1M": dict(
        _COMMON, n_layers=2, n_heads=16, d_head=4, act_fn="gelu_new",
        positional_embedding_type="standard", attn_types=["global", "local"], window_size=4,
        use_local_attn=True, use_attn_scale=False, original_architecture="GPTNeoForCausalLM",
    ),
}
OFFLINE_MODELS["gpt2"] = OFFLINE_MODELS["gpt2-small"]
OFFLINE_MODELS["solu-2l"] = dict(OFFLINE_MODELS["solu-1l"], n_layers=2)
OFFLINE_MODELS["facebook/opt-125m"] = dict(
    _COMMON, n_layers=12, act_fn="relu", positional_embedding_type="standard",
    original_architecture="OPTForCausalLM",
)
OFFLINE_MODELS["attn-only-2l"] = dict(
    _COMMON, n_layers=2, attn_only=True, positional_embedding_type="shortformer", d_mlp=None,
)


_corpus_files: list[str] = []


def word_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained on the selected test files themselves.

    Trained until every word chunk of the corpus is one token, so the prompts written in the tests
    tokenize to as many tokens as with GPT-2's tokenizer (tests hard-code sequence lengths), and
    any other text still round-trips through bytes. BOS = EOS = PAD = ``<|endoftext|>`` (id 0).
    Saved once per corpus and reloaded from disk, so TransformerLens's BOS re-load stays offline.
    """
    import hashlib

    from transformers import AutoTokenizer

    texts = [Path(f).read_text(errors="replace") for f in sorted(_corpus_files)]
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    root = Path(os.environ.get("TL_CONFORMANCE_TOKENIZER_DIR") or "/tmp/tl-conformance-tokenizer")
    folder = root / digest
    if not (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1_000_000, min_frequency=1, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        raw.train_from_iterator(texts, trainer=trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            pad_token="<|endoftext|>", add_bos_token=True,
        )
        tmp = root / f"{digest}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first
            pass
    return AutoTokenizer.from_pretrained(str(folder))


# from_pretrained's weight-processing defaults; from_pretrained_no_processing turns them all off
_PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True,
                   fold_value_biases=True, refactor_factored_attn_matrices=False)


def _offline_loader(processing: bool):
    def from_pretrained(cls, model_name, *args, **kwargs):
        from transformer_lens import HookedTransformerConfig

        fields = OFFLINE_MODELS.get(model_name)
        if fields is None:
            raise RuntimeError(
                f"conformance: from_pretrained({model_name!r}) has no offline stand-in; known: "
                f"{', '.join(sorted(OFFLINE_MODELS))}"
            )
        tok = word_tokenizer()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = HookedTransformerConfig(
                seed=0, d_vocab=len(tok), model_name=model_name,
                default_prepend_bos=kwargs.get("default_prepend_bos", True), **fields,
            )
            model = cls(cfg, tokenizer=tok,
                        default_padding_side=kwargs.get("default_padding_side", "right"))
            # the same processing path as the real loader (the plugin is already enabled, as it is
            # when a real from_pretrained constructs the model and then processes the weights)
            options = {k: kwargs.get(k, v) if processing else False for k, v in _PROCESSING.items()}
            if cfg.attn_only or cfg.normalization_type is None:
                options["fold_ln"] = False
            model.load_and_process_state_dict(model.state_dict(), **options)
        return model.eval()

    return from_pretrained


def _shim_auto_tokenizer() -> None:
    """Hub tokenizer names (``cfg.tokenizer_name="gpt2"``) load the offline word tokenizer."""
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if Path(str(name)).exists():
            return original(cls, name, *args, **kwargs)
        return word_tokenizer()

    AutoTokenizer.from_pretrained = classmethod(from_pretrained)


# ------------------------------------------------------------------------------------------------
# TransformerBridge: enabling on every bridge, bare attention bridges, offline hub names
# ------------------------------------------------------------------------------------------------

# hub name -> (layers, heads) of the offline GPT-2 stand-in: the architecture (GPT2LMHeadModel,
# joint QKV attention, learned positions, LayerNorm, GELU) and the depth/head count of the real
# model, but narrow (d_head 8) and random; the tokenizer is the one trained on the test files
OFFLINE_BRIDGE_MODELS = {
    "gpt2": (12, 12),
    "openai-community/gpt2": (12, 12),
    "distilgpt2": (6, 12),
    "distilbert/distilgpt2": (6, 12),
}
_BRIDGE_INIT_RANGE = 0.2
_bridge_local = threading.local()


def _bridge_depth() -> int:
    return getattr(_bridge_local, "depth", 0)


def _enable_bridge(bridge) -> None:
    from tl_plugins.state import get_state

    state = get_state(bridge)
    if state is not None and _PLUGIN in state.active:
        return  # already enabled (a boot wrapper and the constructor both saw it)
    _enable(bridge, "model_enables")


def _wrap_boot(owner, attr: str) -> None:
    """Wrap a static boot function so that the bridge it returns gets the plugin when the
    outermost boot returns (boot functions post-process the bridge after constructing it)."""
    original = owner.__dict__[attr]
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
    if getattr(func, "_tl_conformance", False):
        return

    @functools.wraps(func)
    def boot(*args, **kwargs):
        _bridge_local.depth = _bridge_depth() + 1
        try:
            bridge = func(*args, **kwargs)
        finally:
            _bridge_local.depth -= 1
        if _bridge_depth() == 0 and _depth() == 0 and _PLUGIN:
            from tl_plugins.backends.bridge import is_bridge

            if is_bridge(bridge):
                _enable_bridge(bridge)
        return bridge

    boot._tl_conformance = True
    setattr(owner, attr, staticmethod(boot) if isinstance(original, staticmethod) else
            classmethod(boot) if isinstance(original, classmethod) else boot)


def _wrap_bridge_init(cls) -> None:
    original = cls.__init__
    if getattr(original, "_tl_conformance", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        _bridge_local.depth = _bridge_depth() + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _bridge_local.depth -= 1
        if _bridge_depth() == 0 and _depth() == 0 and _PLUGIN:
            _enable_bridge(self)

    __init__._tl_conformance = True
    cls.__init__ = __init__


class _ShellCfg:
    """The config of a one-block shell: the attention bridge's own config, seen live, with one
    layer (the shell's) and CPU/float32 where the tests' stub configs say nothing."""

    _DEFAULTS = {"device": "cpu", "dtype": torch.float32}

    def __init__(self, attn):
        object.__setattr__(self, "_attn", attn)

    def __getattr__(self, name):
        if name == "n_layers":
            return 1
        cfg = getattr(self._attn, "config", None)
        if cfg is not None and hasattr(cfg, name):
            return getattr(cfg, name)
        if name in self._DEFAULTS:
            return self._DEFAULTS[name]
        raise AttributeError(name)


def _bridge_shell_for(attn):
    """A TransformerBridge instance whose only block holds the attention bridge ``attn``."""
    from transformer_lens.model_bridge import TransformerBridge

    shell = TransformerBridge.__new__(TransformerBridge)
    torch.nn.Module.__init__(shell)
    object.__setattr__(shell, "cfg", _ShellCfg(attn))
    object.__setattr__(shell, "blocks", [types.SimpleNamespace(attn=attn, _modules={})])
    return shell


_wiring: set = set()  # ids of attention bridges inside set_original_component right now


def _enable_bare_bridge_attention(attn) -> None:
    from tl_plugins.backends.bridge import attention_family

    if "_tl_conformance_shell" in attn.__dict__ or "_tl_plugins_seam" in attn.__dict__:
        return  # wired again (or wired by a shell already): enabled once is enough
    family, _ = attention_family(attn)
    if family is None:  # no seam family (Bloom, ALiBi, MLA, plain AttentionBridge): left alone
        per = _record["bare_unsupported"]
        per[type(attn).__name__] = per.get(type(attn).__name__, 0) + 1
        return
    shell = _bridge_shell_for(attn)
    object.__setattr__(attn, "_tl_conformance_shell", shell)
    before = len(_record["refused"])
    _enable(shell, "module_enables")
    if len(_record["refused"]) > before:
        attn.__dict__.pop("_tl_conformance_shell", None)


def _after_wiring(attn) -> None:
    if _PLUGIN and _bridge_depth() == 0 and _depth() == 0 and id(attn) not in _wiring:
        _enable_bare_bridge_attention(attn)


def _wrap_wiring(cls) -> None:
    """Wrap ``cls.set_original_component`` (outermost call per instance enables afterwards)."""
    original = cls.__dict__["set_original_component"]
    if getattr(original, "_tl_conformance", False):
        return

    @functools.wraps(original)
    def set_original_component(self, *args, **kwargs):
        key = id(self)
        if key in _wiring:
            return original(self, *args, **kwargs)
        _wiring.add(key)
        try:
            result = original(self, *args, **kwargs)
        finally:
            _wiring.discard(key)
        _after_wiring(self)
        return result

    set_original_component._tl_conformance = True
    cls.set_original_component = set_original_component


def _wrap_attention_add_module(attention_cls) -> None:
    """Tests also wire a mock HF module with ``add_module("_original_component", m)``."""
    original = attention_cls.add_module
    if getattr(original, "_tl_conformance", False):
        return

    @functools.wraps(original)
    def add_module(self, name, module):
        original(self, name, module)
        if name == "_original_component":
            _after_wiring(self)

    add_module._tl_conformance = True
    attention_cls.add_module = add_module


def _subclasses(cls) -> list:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def _offline_bridge_model(name: str):
    """(folder, HF model, tokenizer) of the offline stand-in for hub name ``name``."""
    from tl_plugins.models.tiny import hf_model

    n_layers, n_heads = OFFLINE_BRIDGE_MODELS[name]
    tok = word_tokenizer()
    d_head = 8
    hf = hf_model("gpt2", seed=0, d_vocab=len(tok), n_layers=n_layers, n_heads=n_heads,
                  d_model=n_heads * d_head, d_mlp=4 * n_heads * d_head, n_ctx=1024)
    # GPT-2's initializer_range (0.02) on a model this narrow gives near-uniform logits and
    # a constant greedy continuation, which some tests read as "nothing changed": re-initialise
    # with TransformerLens's own stand-in scale (seeded, the global RNG untouched)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        hf.config.initializer_range = _BRIDGE_INIT_RANGE
        hf.apply(hf._init_weights)
    special = tok.bos_token_id  # BOS = EOS = PAD, as GPT-2's <|endoftext|>
    for config in (hf.config, hf.generation_config):
        config.bos_token_id = config.eos_token_id = special
        config.pad_token_id = special
    root = Path(os.environ.get("TL_CONFORMANCE_TOKENIZER_DIR") or "/tmp/tl-conformance-tokenizer")
    folder = root / "bridge-models" / name.replace("/", "--")
    if not (folder / "config.json").exists():
        tmp = folder.parent / f"{folder.name}.tmp{os.getpid()}"
        hf.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process saved it first
            pass
    return str(folder), hf, tok


def _shim_boot_transformers(bridge_cls) -> None:
    """``boot_transformers(<hub name>)`` for the names in OFFLINE_BRIDGE_MODELS boots the offline
    stand-in (with TransformerLens's own boot, every other argument passed through)."""
    original = bridge_cls.__dict__["boot_transformers"]
    func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original

    @functools.wraps(func)
    def boot_transformers(model_name, *args, **kwargs):
        if isinstance(model_name, str) and model_name in OFFLINE_BRIDGE_MODELS and kwargs.get(
                "hf_model") is None and not args:
            folder, hf, tok = _offline_bridge_model(model_name)
            kwargs.update(hf_model=hf, tokenizer=kwargs.get("tokenizer") or tok)
            dtype = kwargs.get("dtype")
            if dtype is not None:
                hf.to(dtype)
            bridge = func(folder, **kwargs)
            bridge.cfg.model_name = model_name
            return bridge
        return func(model_name, *args, **kwargs)

    bridge_cls.boot_transformers = staticmethod(boot_transformers)


def _configure_bridge() -> None:
    import transformer_lens.model_bridge.generalized_components as gc
    import transformer_lens.model_bridge.supported_architectures  # noqa: F401 - their bridges
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    del gc
    _shim_boot_transformers(TransformerBridge)
    _wrap_boot(TransformerBridge, "boot_transformers")
    if "boot_native" in TransformerBridge.__dict__:
        _wrap_boot(TransformerBridge, "boot_native")
    _wrap_bridge_init(TransformerBridge)
    for cls in _subclasses(AttentionBridge):
        if "set_original_component" in cls.__dict__:
            _wrap_wiring(cls)
    _wrap_attention_add_module(AttentionBridge)


# ------------------------------------------------------------------------------------------------
# pytest hooks
# ------------------------------------------------------------------------------------------------


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for arg in config.args:
        path = Path(arg.split("::")[0])
        if path.is_file():
            _corpus_files.append(str(path))
        elif path.is_dir():
            _corpus_files.extend(str(p) for p in path.rglob("test_*.py"))
    module = os.environ.get("TL_CONFORMANCE_PLUGIN_MODULE", "").strip()
    if _PLUGIN:
        import tl_plugins

        if module and tl_plugins.get_plugin_manager().get_plugin(module) is None:
            tl_plugins.register_plugin(importlib.import_module(module), name=module)
        tl_plugins.register_plugin(_SeamCounter(), name="tl-conformance-seam-counter")

    if _SUITE == "bridge":
        _configure_bridge()
    else:
        _configure_hooked()
    _shim_auto_tokenizer()
    _record["started"] = time.time()


def _configure_hooked() -> None:
    from transformer_lens import HookedTransformer
    from transformer_lens.components import Attention, GroupedQueryAttention

    _wrap_init(HookedTransformer, _enable_model, nest=True)
    if "sae_lens" in sys.modules:  # importing it costs seconds; the TL tests never do
        _wrap_init(sys.modules["sae_lens"].HookedSAETransformer, _enable_model, nest=True)
    _wrap_init(Attention, _enable_bare_attention, nest=False)
    _wrap_init(GroupedQueryAttention, _enable_bare_attention, nest=False)
    HookedTransformer.from_pretrained = classmethod(_offline_loader(processing=True))
    HookedTransformer.from_pretrained_no_processing = classmethod(_offline_loader(processing=False))


def pytest_plugin_registered(plugin, manager):
    """Skip the full ``gc.collect()`` TL's root conftest runs after every test.

    Its class-scoped autouse fixture runs once per module-level test function and costs ~0.4 s on
    a torch heap: most of this subset's run time. It only frees memory; no test depends on it.
    """
    path = str(getattr(plugin, "__file__", "") or "")
    if path.endswith(os.path.join("tests", "conftest.py")) and hasattr(plugin, "cleanup_class_memory"):
        import gc

        plugin.gc = types.SimpleNamespace(collect=lambda *a: 0, set_threshold=gc.set_threshold)


def pytest_collectstart(collector):
    global _current_test
    if isinstance(collector, pytest.Module):
        _current_test = collector.nodeid  # models built at import time belong to their file


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _current_test
    _current_test = item.nodeid
    yield
    _current_test = "<between tests>"


def pytest_runtest_logreport(report):
    outcomes = _record["outcomes"]
    nodeid = report.nodeid
    if report.when == "call" or report.outcome != "passed":
        if report.outcome == "failed":
            outcome = "failed" if report.when == "call" else "error"
        else:
            outcome = report.outcome
        if outcomes.get(nodeid) in ("failed", "error"):
            return  # keep the first failure (a teardown error after a failed call)
        outcomes[nodeid] = outcome
        if report.outcome == "failed":
            _record["longrepr"][nodeid] = str(report.longrepr)[-6000:]
        elif report.outcome == "skipped":
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            _record["longrepr"][nodeid] = reason
    durations = _record["durations"]
    durations[nodeid] = round(durations.get(nodeid, 0.0) + report.duration, 3)


def pytest_collectreport(report):
    if report.failed:
        _record["outcomes"][report.nodeid or "<collection>"] = "error"
        _record["longrepr"][report.nodeid or "<collection>"] = str(report.longrepr)[-6000:]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TL_CONFORMANCE_REPORT")
    if not path:
        return
    _record["seconds"] = round(time.time() - _record.get("started", time.time()), 1)
    _record["exitstatus"] = int(exitstatus)
    try:
        Path(path).write_text(json.dumps(_record, indent=1, sort_keys=True))
    except Exception:  # noqa: BLE001 - the report is the only channel back; say why it failed
        traceback.print_exc()
