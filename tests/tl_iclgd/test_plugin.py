"""The plugin's registration, command line, benchmark and report section."""

import json

import pytest
from click.testing import CliRunner

import tl_plugins
from tl_plugins.cli import build_cli


def test_registered_and_observes_only():
    info = {p.name: p for p in tl_plugins.list_plugins()}
    assert "iclgd" in info and info["iclgd"].changes_forward is False


def test_cli_help():
    cli = build_cli()
    runner = CliRunner()
    out = runner.invoke(cli, ["iclgd", "--help"])
    assert out.exit_code == 0 and "compare" in out.output
    out = runner.invoke(cli, ["iclgd", "compare", "--help"])
    assert out.exit_code == 0 and "--task" in out.output and "--baselines" in out.output
    out = runner.invoke(cli, ["iclgd", "tasks"])
    assert out.exit_code == 0 and "antonyms" in out.output


def test_cli_refuses_bad_lr_and_tokenizerless_models():
    from tl_plugins.models import tiny

    runner = CliRunner()
    out = runner.invoke(build_cli(), ["iclgd", "compare", "--lr", "0", "--model", "tiny-llama"])
    assert out.exit_code != 0 and "lr: got 0" in out.output
    if not tiny.hooked_available():
        pytest.skip("transformer_lens.HookedTransformer cannot be imported (transformer-lens 4.x): tiny-llama "
                    "is then a TransformerBridge with a word-level tokenizer, so there is no tokenizer-less model")
    out = runner.invoke(build_cli(), ["iclgd", "compare", "--model", "tiny-llama"])
    assert out.exit_code != 0 and "no tokenizer" in out.output


def test_bench_quick_on_tiny_model():
    """In a fresh process, as ``tl-plugins bench iclgd`` runs: its memory check reads the process's
    resident set, which earlier tests in this one (real models) would already have grown."""
    import json
    import subprocess
    import sys

    code = ("import json; from tl_plugins import bench; r = bench.run('iclgd', quick=True, model='tiny-llama'); "
            "print(json.dumps({'text': r.render(), 'rows': len(r.rows)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "full comparison" in res["text"] and "[PASS] peak memory at most 3 GB" in res["text"]
    assert res["rows"] >= 5


def test_report_section_quick_on_tiny_model(tmp_path):
    from tl_plugins.models import load
    from tl_plugins.report import build_report

    model = load("tiny-llama")
    path = build_report(model, "tiny-llama", tmp_path, options={"quick": True}, progress=False)
    html = path.read_text()
    assert "ICL vs GD" in html and "SimAOU_norm" in html and "section failed" not in html


@pytest.mark.slow
def test_cli_compare_on_smollm2_writes_json(tmp_path, smollm2):
    out_json = tmp_path / "r.json"
    res = CliRunner().invoke(build_cli(), ["iclgd", "compare", "--task", "antonyms", "--n-demos", "3",
                                           "--n-queries", "4", "--no-kendall", "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    assert "SimAOU" in res.output and "lcgd" in res.output
    payload = json.loads(out_json.read_text())
    assert payload["settings"]["n_demos"] == 3 and payload["settings"]["n_layers"] == 30
