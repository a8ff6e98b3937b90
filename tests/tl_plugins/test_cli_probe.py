"""Every bad argument to every command is a usage error: exit code 2, one line naming the option, no
traceback, and (where the argument can be checked without it) no model loaded and no file written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import tl_plugins
from tl_plugins.cli import build_cli


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.fixture
def no_model_load(monkeypatch):
    calls = []
    real = tl_plugins.models.load

    def spy(name, **kw):
        calls.append(name)
        return real(name, **kw)

    monkeypatch.setattr(tl_plugins.models, "load", spy)
    return calls


# (arguments, text the one-line message must contain, whether a model may be loaded first)
CASES = [
    (["report", "--model", "nope"], "unknown model 'nope'", False),
    (["report", "--model", "tiny-gpt2", "--out", "{file}"], "is a file", False),
    (["report", "--model", "tiny-gpt2", "--out", "{file}/sub"], "cannot be created or written", False),
    (["report", "--backend", "nope"], "--backend", False),
    (["bench", "load", "--model", "nope"], "unknown model 'nope'", False),
    (["bench", "load", "--quick", "--json", "{dir}"], "is a directory", False),
    (["bench", "load", "--quick", "--json", "/nonexistent/x.json"], "does not exist", False),
    (["bench", "load", "--quick", "--backend", "bridge"], "does not take a backend", False),
    (["topk", "perplexity", "--model", "nope"], "unknown model 'nope'", False),
    (["topk", "perplexity", "--model", "tiny-gpt2", "--k", "0"], "--k", False),
    (["topk", "perplexity", "--model", "tiny-gpt2", "--k", "x"], "--k", False),
    (["topk", "perplexity", "--model", "tiny-gpt2", "--layers", "5-2"], "--layers", False),
    (["topk", "perplexity", "--model", "tiny-gpt2", "--csv", "{dir}"], "is a directory", False),
    (["topk", "perplexity", "--model", "tiny-gpt2", "--tokens", "1"], "--tokens", False),
    (["topk", "perplexity", "--model", "tiny-gpt2", "--layers", "0,7", "--tokens", "16"], "layers [7] do not exist",
     True),
    (["topk", "sparsity", "--model", "tiny-gpt2", "--k", "0"], "--k", False),
    (["embedspace", "top-tokens", "--model", "nope", "--layer", "0", "--neuron", "1"], "unknown model", False),
    (["embedspace", "top-tokens", "--model", "tiny-gpt2", "--layer", "-1", "--neuron", "1"], "--layer", False),
    (["embedspace", "top-tokens", "--model", "tiny-gpt2", "--layer", "0", "--neuron", "1", "-k", "0"], "-k", False),
    (["embedspace", "top-tokens", "--model", "tiny-gpt2", "--layer", "9", "--neuron", "1"], "layer: got 9", True),
    (["embedspace", "top-tokens", "--model", "tiny-gpt2", "--layer", "0", "--neuron", "99999"], "neuron", True),
    (["embedspace", "pairs", "--model", "tiny-gpt2", "--layer", "0", "--head", "9"], "head: got 9", True),
    (["embedspace", "sweep", "--model", "tiny-gpt2", "--out", "{file}"], "is a file", False),
    (["embedspace", "sweep", "--model", "tiny-gpt2", "--out", "{file}/sub"], "cannot be created", False),
    (["embedspace", "sweep", "--model", "tiny-gpt2", "--out", "{tmp}/s", "--layers", "a,b"], "--layers", False),
    (["embedspace", "sweep", "--model", "tiny-gpt2", "--out", "{tmp}/s", "--layers", "7"], "layer: got 7", True),
    (["embedspace", "find-neurons", "--model", "tiny-gpt2", "--token", "999999"], "token", True),
]


@pytest.mark.parametrize("args, text, loads", CASES, ids=[" ".join(c[0][:3]) + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_is_a_one_line_usage_error(cli, tmp_path, no_model_load, args, text, loads):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    args = [a.format(file=afile, dir=tmp_path, tmp=tmp_path) for a in args]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output and text in res.output, res.output
    error_lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, res.output
    if not loads:
        assert no_model_load == [], f"a model was loaded before the argument was checked: {no_model_load}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
