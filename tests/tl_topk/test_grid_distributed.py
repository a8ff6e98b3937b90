"""``topk perplexity`` over (mode, k, layer set): the grid equals perplexity_sweep (the unsharded
oracle) cell by cell, and under torchrun (2 gloo ranks) a killed rank resumes, the CSV is the one a
single process writes, and ranks with other settings are refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tl_plugins
from tl_plugins.cli import build_cli
from tl_topk.analysis import docs_tokens, perplexity_sweep
from tl_topk.grid import perplexity_grid

ARGS = ["topk", "perplexity", "--model", "tiny-llama", "--k", "2", "--k", "4", "--k", "n", "--mode", "attention",
        "--mode", "feed-forward", "--tokens", "64", "--per-layer"]


def test_grid_rows_equal_perplexity_sweep_per_layer_set():
    model = tl_plugins.models.load("tiny-llama")
    tokens = docs_tokens(model, 48)
    dense, rows = perplexity_grid(model, tokens, [2, "n", 3], modes=["attention", "both"],
                                  layer_sets=[[0], [1], None])
    for name, layers in (("0", [0]), ("1", [1]), ("all", None)):
        ref = perplexity_sweep(model, tokens, [2, "n", 3], modes=["attention", "both"], layers=layers)
        assert [{k: v for k, v in r.items() if k != "layers"} for r in rows if r["layers"] == name] == ref.rows
        assert ref.dense == dense
    assert tl_plugins.active(model) == {}
    one = perplexity_grid(model, tokens, [2], modes=["attention"])[1]
    assert one == perplexity_sweep(model, tokens, [2], modes=["attention"]).rows  # no layers column
    with pytest.raises(ValueError, match="modes: got \\['sideways'\\]"):
        perplexity_grid(model, tokens, [2], modes=["sideways"])


def test_killed_rank_resumes_and_the_csv_equals_one_process(tmp_path, torchrun):
    r = CliRunner().invoke(build_cli(), [*ARGS, "--csv", str(tmp_path / "single.csv")])
    assert r.exit_code == 0, r.output
    csv = tmp_path / "sharded.csv"
    killed = torchrun(2, [*ARGS, "--csv", csv], env={"TL_TEST_KILL": "1:2"})  # rank 1: 2 of its 6 units
    assert killed.returncode != 0 and not csv.exists()
    logs = list((tmp_path / "sharded.csv.shards").glob("rank*.jsonl"))
    assert len(logs) == 2
    rank1 = (tmp_path / "sharded.csv.shards" / "rank00001-of00002.jsonl").read_text().splitlines()
    assert len(rank1) == 1 + 2  # the header and the two units rank 1 finished before it was killed
    resumed = torchrun(2, [*ARGS, "--csv", csv])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 processes" in resumed.stdout
    assert csv.read_bytes() == (tmp_path / "single.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.csv", "single.csv"]


def test_ranks_with_other_settings_are_refused(tmp_path, torchrun):
    other = [*ARGS, "--csv", str(tmp_path / "x.csv")]
    other[other.index("--tokens") + 1] = "65"
    r = torchrun(2, [*ARGS, "--csv", tmp_path / "x.csv"], env={"TL_TEST_ARGS_RANK1": json.dumps(other)})
    assert r.returncode != 0
    assert "settings: rank 1 of 2 was started with other settings than rank 0 (n_tokens=64 on rank 0, 65 on " \
        "rank 1" in r.stdout + r.stderr
    assert not (tmp_path / "x.csv").exists()
