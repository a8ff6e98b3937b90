"""BenchResult: what ``tl-plugins bench NAME --json`` writes is everything the benchmark recorded."""

from __future__ import annotations

import json

from click.testing import CliRunner

import tl_plugins
from tl_plugins.bench import BenchResult
from tl_plugins.cli import build_cli


def test_json_keeps_rows_checks_notes_and_extra():
    r = BenchResult("x", device="cpu")
    r.add(n=1, seconds=0.5)
    r.check("fast", True)
    r.notes.append("a note")
    r.extra = {"per_layer": [{"layer": 0, "sim": 0.25}]}
    back = json.loads(r.to_json())
    assert back == {"name": "x", "rows": [{"n": 1, "seconds": 0.5}], "notes": ["a note"], "device": "cpu",
                    "checks": {"fast": True}, "extra": {"per_layer": [{"layer": 0, "sim": 0.25}]}}


def test_cli_json_writes_the_extra_field(tmp_path):
    def bench_fake(*, quick=False, model="tiny-llama", device="cpu"):
        r = BenchResult("fake", device=device)
        r.add(value=1)
        r.extra = {"table": [1, 2, 3]}
        return r

    class Plugin:
        @tl_plugins.hookimpl
        def tl_plugins_register_benchmarks(self, register):
            register("fake-extra", bench_fake, summary="a benchmark with extra tables")

    pm = tl_plugins.get_plugin_manager()
    plugin = Plugin()
    pm.register(plugin, name="fake-extra-plugin")
    try:
        out = tmp_path / "b.json"
        res = CliRunner().invoke(build_cli(), ["bench", "fake-extra", "--json", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads(out.read_text())["extra"] == {"table": [1, 2, 3]}
    finally:
        pm.unregister(plugin)
