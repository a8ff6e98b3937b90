"""The command line and the report, run as a user would (a subprocess where it matters)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import tl_plugins
from tl_plugins.cli import build_cli
from tl_plugins.report import Report, build_report


@pytest.fixture(scope="module")
def cli():
    return build_cli()


def test_help_everywhere(cli):
    runner = CliRunner()
    for args in (["--help"], ["list", "--help"], ["models", "--help"], ["bench", "--help"], ["report", "--help"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0 and "Usage:" in res.output, args
    assert {"topk", "embedspace", "iclgd"} <= set(cli.commands)  # each plugin registers its group
    for name in ("topk", "embedspace", "iclgd"):
        res = runner.invoke(cli, [name, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output


def test_models_lists_builtins(cli):
    res = CliRunner().invoke(cli, ["models"])
    assert res.exit_code == 0
    for name in ("tiny-gpt2", "tiny-llama", "smollm2-135m"):
        assert name in res.output


def test_bench_lists_and_refuses_unknown(cli):
    runner = CliRunner()
    res = runner.invoke(cli, ["bench"])
    assert res.exit_code == 0 and "load" in res.output
    res = runner.invoke(cli, ["bench", "nope"])
    assert res.exit_code != 0 and "unknown benchmark 'nope'" in res.output


def test_bench_load_quick_on_tiny_model(cli):
    res = CliRunner().invoke(cli, ["bench", "load", "--quick", "--model", "tiny-gpt2"])
    assert res.exit_code == 0, res.output
    assert "warm (median)" in res.output and "device: CPU" in res.output


def test_report_is_self_contained(tmp_path):
    model = tl_plugins.models.load("tiny-gpt2")
    path = build_report(model, "tiny-gpt2", tmp_path, options={"quick": True, "load_seconds": 0.1},
                        progress=False)
    html = path.read_text()
    assert path.name == "index.html"
    assert "Model card" in html and "d_model" in html
    assert not re.search(r"<script[^>]+src=[\"']https?://", html)  # no CDN: opens offline
    assert "section failed" not in html, re.findall(r"<h2[^>]*>([^<]*failed)</h2>", html)


def test_a_failing_section_does_not_lose_the_report(tmp_path, temp_plugin):
    from tl_plugins import hookimpl

    class Bad:
        @staticmethod
        @hookimpl
        def tl_plugins_report_sections(report):
            raise ValueError("this section is broken")

    temp_plugin(Bad, "test-bad-section")
    html = build_report(tl_plugins.models.load("tiny-gpt2"), "tiny-gpt2", tmp_path,
                        options={"quick": True}, progress=False).read_text()
    assert "test-bad-section: section failed" in html and "this section is broken" in html
    assert "Model card" in html


def test_report_sections_see_the_model():
    model = tl_plugins.models.load("tiny-llama")
    r = Report(model, "tiny-llama", options={"quick": True}, progress=False)
    from tl_plugins.builtins.model_card import model_card_section

    model_card_section(r)
    (card, plugins) = r.sections[0].tables
    fields = dict(zip(card["field"], card["value"]))
    assert fields["n_key_value_heads"] == 2 and fields["weight processing"] == "unprocessed (recorded)"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_report_on_a_bridge_has_every_section(tmp_path, name):
    pytest.importorskip("transformer_lens.model_bridge")
    res = CliRunner().invoke(build_cli(), ["report", "--model", name, "--backend", "bridge", "--quick",
                                           "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "index.html").read_text()
    assert "bridge: TransformerBridge" in html
    assert "section failed" not in html, re.findall(r"<h2[^>]*>([^<]*failed)</h2>", html)


def test_backend_options_are_usage_errors_when_wrong(cli):
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "load", "--quick", "--backend", "bridge"])
    assert res.exit_code == 2 and "--backend" in res.output and "does not take a backend" in res.output
    res = runner.invoke(cli, ["report", "--backend", "nope"])
    assert res.exit_code == 2 and "--backend" in res.output
