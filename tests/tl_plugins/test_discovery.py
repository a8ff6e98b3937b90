"""Plugin discovery through the real entry points of the installed distribution, and the switches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tl_plugins
from tl_plugins.errors import PluginBlockedError
from tl_plugins.plugins import entry_points

OURS = {"topk", "embedspace", "iclgd"}


@pytest.fixture
def fresh_manager(monkeypatch):
    for var in ("TL_PLUGINS_AUTOLOAD", "TL_PLUGINS_LOAD", "TL_PLUGINS_BLOCK"):
        monkeypatch.delenv(var, raising=False)
    tl_plugins.reset_plugin_manager()
    yield monkeypatch
    monkeypatch.undo()
    tl_plugins.reset_plugin_manager()


def test_our_plugins_come_from_the_installed_distribution(fresh_manager):
    recs = {r.name: r for r in entry_points()}
    assert OURS <= set(recs)
    for name in OURS:
        assert recs[name].dist == "tl-plugins"
        assert recs[name].status == "loaded", recs[name].status
    listed = {p.name: p for p in tl_plugins.list_plugins()}
    assert OURS <= set(listed)
    assert "entry point" in listed["topk"].source


def test_block_switch(fresh_manager):
    fresh_manager.setenv("TL_PLUGINS_BLOCK", "topk")
    recs = {r.name: r for r in entry_points()}
    assert recs["topk"].status.startswith("blocked")
    assert "topk" not in {p.name for p in tl_plugins.list_plugins()}
    model = tl_plugins.models.load("tiny-gpt2")
    with pytest.raises(PluginBlockedError, match="TL_PLUGINS_BLOCK"):
        tl_plugins.enable(model, "topk", k=4)
    assert tl_plugins.active(model) == {}


def test_load_switch(fresh_manager):
    fresh_manager.setenv("TL_PLUGINS_LOAD", "iclgd")
    recs = {r.name: r.status for r in entry_points()}
    assert recs["iclgd"] == "loaded"
    assert recs["topk"].startswith("not loaded") and recs["embedspace"].startswith("not loaded")


def test_autoload_off_keeps_builtins(fresh_manager):
    fresh_manager.setenv("TL_PLUGINS_AUTOLOAD", "0")
    assert all(r.status.startswith("not loaded") for r in entry_points())
    assert tl_plugins.list_plugins() == []
    assert "tiny-gpt2" in tl_plugins.models.available()  # built-ins are plugins too, always there


def test_throwaway_plugin_registers_and_unregisters(fresh_manager, scale_plugin):
    assert "scale" in {p.name for p in tl_plugins.list_plugins()}
    tl_plugins.unregister_plugin(name="test-scale")
    assert "scale" not in {p.name for p in tl_plugins.list_plugins()}
    tl_plugins.register_plugin(scale_plugin, name="test-scale")  # the fixture unregisters it again


def test_cli_list_shows_sources_and_block_status():
    env = {**os.environ, "TL_PLUGINS_BLOCK": "iclgd"}
    out = subprocess.run([sys.executable, "-m", "tl_plugins.cli", "list"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "iclgd" in out and "blocked (TL_PLUGINS_BLOCK)" in out
    assert "entry point topk" in out


def test_a_plugin_that_raises_in_a_register_hook_does_not_break_the_host():
    from tl_plugins import hookimpl
    from tl_plugins.plugins import collect, plugin_errors

    class Broken:
        @staticmethod
        @hookimpl
        def tl_plugins_register_benchmarks(register):
            raise ImportError("missing dependency xyz")

    tl_plugins.register_plugin(Broken, name="test-broken-bench")
    try:
        with pytest.warns(UserWarning, match="missing dependency xyz"):
            found = collect("tl_plugins_register_benchmarks")
        assert "load" in found
        assert any(n == "test-broken-bench" and "xyz" in t for n, _, t in plugin_errors)
    finally:
        tl_plugins.unregister_plugin(name="test-broken-bench")
        plugin_errors.clear()
