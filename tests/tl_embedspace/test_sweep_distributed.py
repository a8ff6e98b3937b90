"""``tl-plugins embedspace sweep`` under torchrun (2 gloo ranks on the CPU) writes the bytes a
one-process sweep writes, resumes after a rank is killed, and refuses ranks with other settings."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tl_plugins.cli import build_cli

ARGS = ["embedspace", "sweep", "--model", "tiny-llama", "-k", "5", "--k-neurons", "3"]
RUN_ONLY = {"seconds", "world_size", "written", "skipped_existing", "recomputed_damaged"}


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _single(out):
    r = CliRunner().invoke(build_cli(), [*ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return _files(out)


def _same_as_single(single, sharded, world_size):
    assert set(single) == set(sharded)  # same names: no shard or temporary file left behind
    for name in single:
        if name != "summary.json":
            assert sharded[name] == single[name], name  # same bytes
    a, b = json.loads(single["summary.json"]), json.loads(sharded["summary.json"])
    assert {k: v for k, v in a.items() if k not in RUN_ONLY} == {k: v for k, v in b.items() if k not in RUN_ONLY}
    assert (a["world_size"], b["world_size"]) == (1, world_size)
    return b


def test_killed_rank_resumes_and_the_merge_equals_one_process(tmp_path, torchrun):
    single = _single(tmp_path / "single")
    out = tmp_path / "sharded"
    killed = torchrun(2, [*ARGS, "--out", out], env={"TL_TEST_KILL": "1:2"})  # rank 1 dies after 2 items
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert "summary.json" not in _files(out)
    left = [n for n in _files(out) if n.startswith(("heads/", "neurons/"))]
    assert 2 <= len(left) < 18
    resumed = torchrun(2, [*ARGS, "--out", out])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "on 2 process(es)" in resumed.stdout
    summary = _same_as_single(single, _files(out), 2)
    assert summary["skipped_existing"] == len(left) and summary["written"] == 18 - len(left)


def test_ranks_with_other_settings_are_refused_before_anything_is_written(tmp_path, torchrun):
    out = tmp_path / "run"
    other = json.dumps([*ARGS[:-3], "6", "--k-neurons", "3", "--out", str(out)])
    r = torchrun(2, [*ARGS, "--out", out], env={"TL_TEST_ARGS_RANK1": other})
    assert r.returncode != 0
    assert "settings: rank 1 of 2 was started with other settings than rank 0 (k=5 on rank 0, 6 on rank 1" \
        in r.stdout + r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_smollm2_slice_two_ranks_equal_one_process(tmp_path, torchrun):
    args = ["embedspace", "sweep", "--model", "smollm2-135m", "--layers", "0", "-k", "20", "--k-neurons", "5"]
    r = CliRunner().invoke(build_cli(), [*args, "--out", str(tmp_path / "single")])
    assert r.exit_code == 0, r.output
    single = _files(tmp_path / "single")
    r2 = torchrun(2, [*args, "--out", tmp_path / "sharded"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    _same_as_single(single, _files(tmp_path / "sharded"), 2)
