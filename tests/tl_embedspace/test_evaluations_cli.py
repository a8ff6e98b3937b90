"""The paper's evaluations (against hand-built cases), the resumable sweep, the CLI, bench and report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import tl_plugins
from tl_embedspace import EmbeddingSpace
from tl_embedspace.evaluations import hidden_state_overlap, related_pairs
from tl_embedspace.sweep import sweep, sweep_items
from tl_plugins.cli import build_cli
from tl_plugins.models import tiny


@pytest.fixture(scope="module")
def tied_small():
    m = tiny.build(tiny.TINY_GPT2, n_layers=2, d_vocab=60, seed=3)
    with torch.no_grad():
        m.unembed.W_U.copy_(m.embed.W_E.T)
    return m


def test_related_pairs_detects_planted_agreement(tied_small):
    m = tied_small
    sp = EmbeddingSpace(m)
    base = related_pairs(sp, k=10, max_vectors=None)
    planted = tiny.build(tiny.TINY_GPT2, n_layers=2, d_vocab=60, seed=3)
    with torch.no_grad():
        planted.unembed.W_U.copy_(planted.embed.W_E.T)
        for b in planted.blocks:  # every neuron's key equals its value: K/V agree perfectly
            b.mlp.W_in.copy_(b.mlp.W_out.T)
    res = related_pairs(EmbeddingSpace(planted), k=10, max_vectors=None, which=("K/V neuron",))
    df = res.to_frame()
    assert (df.score == 1.0).all()
    assert (df.baseline < 0.6).all()
    s = base.summary()
    assert set(s.evaluation) == {"K/V neuron", "W_V/W_O", "W_Q/W_K"}
    assert {"score", "baseline", "ratio"} <= set(s.columns)


def test_hidden_state_overlap_runs_and_matches_a_hand_count(tied_small):
    sp = EmbeddingSpace(tied_small)
    toks = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(0))
    res = hidden_state_overlap(sp, toks, layers=[1], n_neurons=3, k=5)
    row = res.to_frame().iloc[0]
    assert row.n == 9 and 0.0 <= row.score <= 1.0 and 0.0 <= row.baseline <= 1.0
    # recount position 0 by hand
    _, cache = tied_small.run_with_cache(toks)
    act = cache["blocks.1.mlp.hook_post"][0]
    hid = cache["blocks.1.hook_resid_post"][0]
    E = tied_small.W_U.detach()
    scores = []
    for p in range(9):
        top = torch.topk(act[p], 3).indices
        union = set()
        for n in top.tolist():
            union |= set(torch.topk(tied_small.blocks[1].mlp.W_out.detach()[n] @ E, 5).indices.tolist())
        hid_top = set(torch.topk(hid[p] @ E, 5).indices.tolist())
        scores.append(len(union & hid_top) / 5)
    assert row.score == pytest.approx(sum(scores) / 9)


def test_sweep_writes_and_resumes(tmp_path, tied_small):
    sp = EmbeddingSpace(tied_small)
    s1 = sweep(sp, tmp_path, k=5, k_neurons=3, fmt="parquet", progress=False)
    items = sweep_items(sp)
    assert s1["written"] == len(items) == 2 * (2 * 4 + 1)
    df = pd.read_parquet(tmp_path / "heads" / "ov_L1H2.parquet")
    ref = sp.ov(1, 2).topk_pairs(5).to_frame()
    assert df.row_id.tolist() == ref.row_id.tolist() and df.col_id.tolist() == ref.col_id.tolist()
    vals = pd.read_parquet(tmp_path / "neurons" / "values_L0.parquet")
    assert len(vals) == tied_small.cfg.d_mlp * 3
    first = vals[vals.neuron == 4]
    assert first.id.tolist() == sp.ff_value(0, 4, k=3).top_ids.tolist()
    (tmp_path / "heads" / "qk_L0H1.parquet").unlink()  # as if interrupted before this item
    s2 = sweep(sp, tmp_path, k=5, k_neurons=3, fmt="parquet", progress=False)
    assert s2["written"] == 1 and s2["skipped_existing"] == len(items) - 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["copying_scores"]) == 2


def test_cli_commands(tmp_path):
    cli = build_cli()
    r = CliRunner().invoke(cli, ["embedspace", "pairs", "--model", "tiny-llama", "--layer", "1", "--head", "2",
                                 "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    sp = EmbeddingSpace(tl_plugins.models.load("tiny-llama"))
    assert [(row["row_id"], row["col_id"]) for row in out["rows"]] == sp.ov(1, 2).topk_pairs(3).pairs()
    r = CliRunner().invoke(cli, ["embedspace", "find-neurons", "--model", "tiny-gpt2", "--token", "5", "-k", "2"])
    assert r.exit_code == 0 and "neuron" in r.output
    r = CliRunner().invoke(cli, ["embedspace", "top-tokens", "--model", "tiny-gpt2", "--layer", "0",
                                 "--neuron", "9", "--kind", "key", "-k", "2"])
    assert r.exit_code == 0 and "L0N9 key" in r.output
    r = CliRunner().invoke(cli, ["embedspace", "top-tokens", "--model", "tiny-gpt2", "--layer", "0",
                                 "--neuron", "999"])
    assert r.exit_code == 2 and "neuron: got 999" in r.output  # a usage error, not a traceback
    r = CliRunner().invoke(cli, ["embedspace", "sweep", "--model", "tiny-gpt2", "--out", str(tmp_path / "s"),
                                 "--format", "json", "--layers", "1", "--no-neurons"])
    assert r.exit_code == 0 and (tmp_path / "s" / "heads" / "ov_L1H0.json").exists()
    for sub in ("top-tokens", "pairs", "sweep", "find-neurons"):
        assert CliRunner().invoke(cli, ["embedspace", sub, "--help"]).exit_code == 0


def test_bench_quick_on_a_tiny_model():
    from tl_embedspace.bench import bench_embedspace

    res = bench_embedspace(quick=True, model="tiny-gpt2")
    df = res.to_frame()
    assert "seconds" in df.columns and len(df) >= 6
    assert res.checks["streaming and dense agree on the slice"]
    # the note is there exactly when the machine has no CUDA device; the figures are CPU figures
    assert ("no GPU figure" in " ".join(res.notes)) == (not torch.cuda.is_available())
    assert res.device.startswith("CPU ")


def test_report_section_quick(tied_small):
    from tl_embedspace.report import report_section
    from tl_plugins.report import Report

    rep = Report(tied_small, "tiny", options={"quick": True}, progress=False)
    report_section(rep)
    (sec,) = rep.sections
    assert len(sec.figures) == 1 and len(sec.tables) == 3
    ev = sec.tables[2]
    assert {"K/V neuron", "W_V/W_O", "W_Q/W_K"} <= set(ev.evaluation)
