"""``iclgd compare`` over tasks x rates x seeds: each cell equals compare() (the unsharded oracle), and
under torchrun (2 gloo ranks) a killed rank resumes, the merge equals one process, other settings are
refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

import tl_plugins
from tl_iclgd.compare import compare
from tl_iclgd.gd import GDConfig
from tl_iclgd.grid import cli_task, compare_grid, grid_file
from tl_plugins.cli import build_cli

SMALL = dict(n_demos=3, n_queries=4, batch_size=64)
ARGS = ["iclgd", "compare", "--model", "tiny-llama", "--task", "copy_token", "--lr", "0.01,0.1", "--seeds", "0,1",
        "--n-demos", "3", "--n-queries", "4", "--baselines", "untrained"]


def test_each_cell_equals_compare_and_the_shards_are_gone(tmp_path):
    model = tl_plugins.models.load("tiny-llama")
    task = cli_task("copy_token", model, 3, 4)
    grid = compare_grid(model, [task], [0.01, 0.1], GDConfig(), seeds=(0, 1), baselines=("untrained",),
                        out_dir=tmp_path, num_threads=1, **SMALL)
    assert set(grid) == {("copy_token", 0.01), ("copy_token", 0.1)}
    for (_, lr), cell in grid.items():
        ref = compare(model, task, GDConfig(lr=lr), seeds=(0, 1), baselines=("untrained",), num_threads=1, **SMALL)
        pd.testing.assert_frame_equal(cell.layers, ref.layers, check_exact=True)
        pd.testing.assert_frame_equal(cell.runs, ref.runs, check_exact=True)
        drop = ("seconds",)
        assert {k: v for k, v in cell.settings.items() if k not in drop} == \
            {k: v for k, v in ref.settings.items() if k not in drop}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([grid_file("copy_token", 0.01), grid_file("copy_token", 0.1), "summary.json"])
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 1


def test_grid_arguments_are_checked():
    model = tl_plugins.models.load("tiny-llama")
    with pytest.raises(ValueError, match="lrs: got \\[0.1, 0.1\\]; accepted: a non-empty list of distinct"):
        compare_grid(model, ["antonyms"], [0.1, 0.1])
    with pytest.raises(ValueError, match="tasks: got \\[\\]"):
        compare_grid(model, [], [0.1])
    r = CliRunner().invoke(build_cli(), ["iclgd", "compare", "--model", "tiny-llama", "--task", "copy_token",
                                         "--lr", "0.1,0.2"])
    assert r.exit_code == 2 and "give --out FOLDER" in r.output
    r = CliRunner().invoke(build_cli(), ["iclgd", "compare", "--model", "tiny-llama", "--lr", "0.1,x"])
    assert r.exit_code == 2 and "'0.1,x'" in r.output


def _cells(folder):
    out = {}
    for p in sorted(folder.iterdir()):
        data = json.loads(p.read_text())
        if p.name != "summary.json":
            data["settings"].pop("seconds")  # work time, differs run to run
        out[p.name] = data
    return out


def test_killed_rank_resumes_and_the_merge_equals_one_process(tmp_path, torchrun):
    r = CliRunner().invoke(build_cli(), [*ARGS, "--out", str(tmp_path / "single")])
    assert r.exit_code == 0, r.output
    single = _cells(tmp_path / "single")
    out = tmp_path / "sharded"
    killed = torchrun(2, [*ARGS, "--out", out], env={"TL_TEST_KILL": "1:2"})  # rank 1 dies after 2 of 4 units
    assert killed.returncode != 0
    assert not (out / "summary.json").exists() and (out / ".shards").is_dir()
    resumed = torchrun(2, [*ARGS, "--out", out])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sharded = _cells(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(single)  # no shard folder left
    for name in single:
        if name != "summary.json":
            assert sharded[name] == single[name], name
    summary = sharded["summary.json"]
    assert summary["world_size"] == 2 and summary["units"] == 8
    assert [(s["units"], s["resumed"] >= 2 if s["rank"] == 1 else True) for s in summary["ranks"]] == \
        [(4, True), (4, True)]
    assert sum(s["computed"] + s["resumed"] for s in summary["ranks"]) == 8


def test_ranks_with_other_settings_are_refused(tmp_path, torchrun):
    out = tmp_path / "run"
    other = [*ARGS, "--out", str(out)]
    other[other.index("--seeds") + 1] = "0,2"
    r = torchrun(2, [*ARGS, "--out", out], env={"TL_TEST_ARGS_RANK1": json.dumps(other)})
    assert r.returncode != 0
    assert "settings: rank 1 of 2 was started with other settings than rank 0" in r.stdout + r.stderr
    assert "seeds=[0, 1] on rank 0, [0, 2] on rank 1" in r.stdout + r.stderr
    assert not (out / "summary.json").exists()
