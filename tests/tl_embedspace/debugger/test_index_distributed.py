"""``tl-plugins debug index`` under torchrun (2 gloo ranks): a rank killed mid-build and rerun gives
the SQLite file a one-process build writes, byte for byte; ranks with other settings are refused."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tl_plugins.cli import build_cli

ARGS = ["debug", "--model", "tiny-llama", "index", "--heads"]


def _index_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_killed_rank_resumes_and_the_index_equals_one_process(tmp_path, torchrun):
    r = CliRunner().invoke(build_cli(), ARGS)  # into tmp_path / "index" (the folder's conftest)
    assert r.exit_code == 0, r.output
    single = _index_files(tmp_path / "index")
    (name,) = single
    env = {"TL_PLUGINS_CACHE": str(tmp_path / "sharded")}
    killed = torchrun(2, ARGS, env={**env, "TL_TEST_KILL": "1:1"})  # rank 1 dies after its first block
    assert killed.returncode != 0
    left = _index_files(tmp_path / "sharded" / "debugger-index")
    assert name not in left and any(n.startswith(name + ".rank00001-of00002") for n in left)
    resumed = torchrun(2, ARGS, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(2 processes)" in resumed.stdout
    assert _index_files(tmp_path / "sharded" / "debugger-index") == single  # the same file, and no shard left


def test_ranks_with_other_settings_are_refused(tmp_path, torchrun):
    env = {"TL_PLUGINS_CACHE": str(tmp_path), "TL_TEST_ARGS_RANK1": json.dumps([*ARGS, "--n-tokens", "20"])}
    r = torchrun(2, ARGS, env=env)
    assert r.returncode != 0
    assert "settings: rank 1 of 2 was started with other settings than rank 0" in r.stdout + r.stderr
    assert "n_tokens=30 on rank 0, 20 on rank 1" in r.stdout + r.stderr
    assert _index_files(tmp_path / "debugger-index") == {}
