"""The host's sharding pieces on one process: the split, the environment, fingerprints, shard logs.

The multi-process paths (gloo all_gather, a refused settings mismatch, a killed rank) are tested
through the commands themselves, under torchrun: tests/tl_embedspace/test_sweep_distributed.py and
the iclgd and topk tests.
"""

from __future__ import annotations

import json
import random

import pytest

from tl_plugins import distributed as D


@pytest.mark.parametrize("n,world", [(0, 1), (1, 3), (7, 2), (18, 4), (100, 7), (5, 8)])
def test_owners_cover_every_unit_once_in_contiguous_balanced_blocks(n, world):
    rng = random.Random(n * 31 + world)
    for weights in (None, [rng.uniform(0.1, 10) for _ in range(n)]):
        own = D.owners(n, world, weights)
        assert len(own) == n and own == sorted(own) and all(0 <= r < world for r in own)
        w = [1.0] * n if weights is None else weights
        total = sum(w)
        for r in range(world):  # each rank's load is its fair share give or take one unit
            load = sum(x for x, o in zip(w, own) if o == r)
            assert load <= total / world + max(w, default=0) + 1e-9
        parts = [D.split(list(range(n)), r, world, weights) for r in range(world)]
        assert sum(parts, []) == list(range(n))
    assert D.owners(n, world) == D.owners(n, world)  # deterministic


def test_owners_and_split_refuse_bad_arguments():
    with pytest.raises(ValueError, match="world_size: got 0; accepted: an int >= 1"):
        D.owners(3, 0)
    with pytest.raises(ValueError, match="weights: got 2 weights for 3 units"):
        D.owners(3, 2, [1, 2])
    with pytest.raises(ValueError, match="weights: .*accepted: finite numbers > 0"):
        D.owners(2, 2, [1, 0])
    with pytest.raises(ValueError, match="rank: got 2; accepted"):
        D.split([1, 2], 2, 2)


def test_from_env_reads_torchrun_variables_and_refuses_bad_ones():
    assert D.from_env({}) == D.SINGLE
    assert D.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == D.SINGLE
    ctx = D.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed, ctx.is_main) == (3, 4, 1, True, False)
    with pytest.raises(ValueError, match="RANK: got 4; accepted: 0 .. 3"):
        D.from_env({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ValueError, match="RANK: not set"):
        D.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE: got 'two'"):
        D.from_env({"WORLD_SIZE": "two"})


def test_session_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with D.session() as ctx:
        assert ctx == D.SINGLE and D.current() == D.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR: not set"):
        with D.session():
            pass
    with pytest.raises(ValueError, match="backend: got 'mpi'"):
        with D.session("mpi"):
            pass


def test_fingerprint_is_order_free_and_sensitive_to_values():
    assert D.fingerprint({"a": 1, "b": [1, 2]}) == D.fingerprint({"b": [1, 2], "a": 1})
    assert D.fingerprint({"a": 1}) != D.fingerprint({"a": 2})
    assert D.agree({"a": 1}) == D.fingerprint({"a": 1})


def _run(tmp_path, fn, units=tuple((u, u % 3) for u in range(7)), settings=None):
    merged = {}

    def merge(results, stats):
        merged["results"], merged["stats"] = results, stats
        return "merged"

    out = D.sharded_map("test", list(units), fn, shard_dir=tmp_path / "shards",
                        settings=settings or {"s": 1}, merge=merge)
    return out, merged


def test_sharded_map_resumes_after_a_crash_and_leaves_no_shards(tmp_path):
    calls = []

    def crashing(unit):
        if unit[0] == 4 and not calls.count("crashed"):
            calls.append("crashed")
            raise KeyboardInterrupt  # not an Exception: escapes like a kill would
        calls.append(unit[0])
        return {"x": unit[0] / 3, "nan": float("nan")}

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, crashing)
    assert calls == [0, 1, 2, 3, "crashed"]
    log = tmp_path / "shards" / "rank00000-of00001.jsonl"
    log.write_bytes(log.read_bytes() + b'{"unit": "[9,0]", "res')  # a line cut short by the crash
    out, merged = _run(tmp_path, crashing)
    assert out == "merged" and calls[5:] == [4, 5, 6]  # units 0-3 came from the shard
    assert [r["x"] for r in merged["results"]] == [u / 3 for u in range(7)]  # exact through JSON
    s = merged["stats"][0]
    assert (s.units, s.computed, s.resumed) == (7, 3, 4)
    assert not (tmp_path / "shards").exists()


def test_shards_of_other_settings_are_refused_before_any_unit_runs(tmp_path):
    def stop(unit):
        if unit[0] == 2:
            raise KeyboardInterrupt
        return unit[0]

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop, settings={"k": 5})
    ran = []
    with pytest.raises(ValueError, match=r"out: .* holds shards of a run with other settings"):
        _run(tmp_path, lambda u: ran.append(u), settings={"k": 6})
    assert ran == []
    header = json.loads((tmp_path / "shards" / "rank00000-of00001.jsonl").read_text().splitlines()[0])
    assert header["settings"] == {"k": 5} and header["world_size"] == 1


def test_sharded_map_refuses_duplicate_units(tmp_path):
    with pytest.raises(ValueError, match="units: got 2 units with 1 distinct"):
        _run(tmp_path, lambda u: u, units=[(1, 2), (1, 2)])


def test_checked_reraises_the_rank_s_own_error():
    with pytest.raises(ZeroDivisionError):
        D.checked(lambda: 1 / 0)
    assert D.checked(lambda: 3) == 3
