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

Environment:
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
    "mlp_activation_calls": 0,
    "cycle_leftovers": [],
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


def _slots(model) -> dict:
    """The instance slots a seam takes over (``forward``, ``act_fn``) and what fills them."""
    out = {}
    for name, module in _modules_of(model):
        for key in ("forward", "act_fn"):
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

    from transformer_lens import HookedTransformer
    from transformer_lens.components import Attention, GroupedQueryAttention

    _wrap_init(HookedTransformer, _enable_model, nest=True)
    if "sae_lens" in sys.modules:  # importing it costs seconds; the TL tests never do
        _wrap_init(sys.modules["sae_lens"].HookedSAETransformer, _enable_model, nest=True)
    _wrap_init(Attention, _enable_bare_attention, nest=False)
    _wrap_init(GroupedQueryAttention, _enable_bare_attention, nest=False)
    HookedTransformer.from_pretrained = classmethod(_offline_loader(processing=True))
    HookedTransformer.from_pretrained_no_processing = classmethod(_offline_loader(processing=False))
    _shim_auto_tokenizer()
    _record["started"] = time.time()


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
