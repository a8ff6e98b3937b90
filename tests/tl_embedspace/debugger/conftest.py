"""Fixtures for the debugger tests: the tiny Llama as a (HookedTransformer, TransformerBridge) pair
on the same weights where transformer-lens 3.x has both, else the bridge alone (4.x); a tiny
GPT-2 (LayerNorm, non-gated MLP); each test's value index under its own tmp folder."""

from __future__ import annotations

import warnings

import pytest

from tl_plugins.models import tiny


def _models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tiny.hooked_available():
            h, b = tiny.hf_pair("llama")
            return {"hooked": h, "bridge": b}
        return {"bridge": tiny.tiny_bridge("llama")}


_CACHE = {}


def _get():
    if not _CACHE:
        _CACHE.update(_models())
    return _CACHE


@pytest.fixture(scope="session")
def llama_models():
    return _get()


@pytest.fixture(scope="session", params=["hooked", "bridge"])
def llama(request):
    models = _get()
    if request.param not in models:
        pytest.skip("no HookedTransformer on transformer-lens 4.x: the bridge covers it")
    return models[request.param]


@pytest.fixture(scope="session")
def gpt2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny.tiny_gpt2()


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_PLUGINS_CACHE_DEBUGGER_TEST", "1")
    monkeypatch.setattr("tl_embedspace.debugger.index.index_dir", lambda: tmp_path / "index")
