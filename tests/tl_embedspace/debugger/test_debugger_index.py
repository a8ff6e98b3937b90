"""The value index against dense brute force: top/bottom tokens, exact search, concept
enrichment, clustering; staleness (a changed weight never reads the old index), corruption
(rebuilt, with a warning), an interrupted build resumed."""

from __future__ import annotations

import copy
import sqlite3

import pytest
import torch

from tl_embedspace.debugger import IndexRebuiltWarning, ValueIndex, core
from tl_embedspace.debugger.model import debug_weights


def test_two_sided_topk_is_dense():
    g = torch.Generator().manual_seed(0)
    V, B = torch.randn(70, 16, generator=g), torch.randn(16, 300, generator=g)
    B[:, 7] = B[:, 3]  # a tie
    tv, ti, bv, bi = core.two_sided_topk(V, B, 9, budget_bytes=20_000)
    C = V @ B
    for r in range(70):
        order = sorted(range(300), key=lambda j: (-float(C[r, j]), j))[:9]
        assert ti[r].tolist() == order
        order = sorted(range(300), key=lambda j: (float(C[r, j]), j))[:9]
        assert bi[r].tolist() == order
    assert torch.allclose(tv, C.gather(1, ti), atol=1e-5) and torch.allclose(bv, C.gather(1, bi), atol=1e-5)


def test_moments_and_gram_root():
    g = torch.Generator().manual_seed(1)
    V, B = torch.randn(20, 8, generator=g), torch.randn(8, 500, generator=g)
    mean, std = core.score_moments(V, B)
    C = V @ B
    assert torch.allclose(mean, C.mean(1), atol=1e-4) and torch.allclose(std, C.std(1, unbiased=False), atol=1e-4)
    R = core.gram_root(B)
    assert torch.allclose((V @ R) @ (V @ R).T, C @ C.T, rtol=1e-3, atol=1e-2)


def test_index_matches_dense(llama):
    idx = ValueIndex.build(llama, n_tokens=8, progress=False)
    dw = debug_weights(llama)
    B = dw.readout_basis()
    for layer, unit in [(0, 0), (1, 77), (1, 127)]:
        s = dw.W_out[layer, unit] @ B
        d = idx.value(layer, unit)
        assert [x["id"] for x in d["top"]] == torch.argsort(-s, stable=True)[:8].tolist()
        assert [x["id"] for x in d["bottom"]] == torch.argsort(s, stable=True)[:8].tolist()
    # exact search: brute force over all values
    tok = llama.tokenizer
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in ("w9", "w40")]
    S = dw.W_out.reshape(-1, dw.W_out.shape[-1]) @ B
    z = ((S[:, ids] - S.mean(1, keepdim=True)) / S.std(1, unbiased=False, keepdim=True)).mean(1)
    got = idx.search(["w9", "w40"], k=10)
    assert got.layer.mul(dw.d_mlp).add(got.unit).tolist() == torch.argsort(-z, stable=True)[:10].tolist()
    assert torch.allclose(torch.tensor(got.score.values), z[torch.argsort(-z, stable=True)[:10]], atol=1e-4)
    c = idx.concept(["w9", "w40", "w41"], k=5)
    top = torch.cat([torch.tensor(idx.blocks[("ffn", l)].top_ids) for l in range(dw.n_layers)])
    hits = torch.isin(top, torch.tensor(sorted(set(ids + [tok.encode("w41", add_special_tokens=False)[0]])))).sum(1)
    assert int(c.hits.iloc[0]) == int(hits.max())
    cl = idx.cluster(5, seed=0)
    assert cl.to_frame().cluster.nunique() <= 5 and len(cl.to_frame()) == dw.W_out.shape[0] * dw.d_mlp
    with pytest.raises(ValueError, match="not a single token"):
        idx.search(["w9 w10"])
    with pytest.raises(IndexError, match="unit: got 999"):
        idx.value(0, 999)


def test_load_reuses_then_rejects_changed_weights(llama):
    idx = ValueIndex.load(llama, n_tokens=6, progress=False)
    again = ValueIndex.load(llama, n_tokens=6, progress=False)
    assert again.path == idx.path
    other = copy.deepcopy(llama)
    W = dict(other.named_parameters())
    name = next(n for n in W if ("W_out" in n or "down_proj" in n) and ("blocks.1." in n or "layers.1." in n))
    with torch.no_grad():
        W[name].view(-1)[0] += 1.0
    changed = ValueIndex.load(other, n_tokens=6, progress=False)
    assert changed.path != idx.path
    with pytest.raises(ValueError, match="built for other weights"):
        idx.check_model(other)


def test_corrupt_and_partial_are_rebuilt(llama):
    idx = ValueIndex.load(llama, n_tokens=5, progress=False)
    good = idx.value(1, 3)
    con = sqlite3.connect(idx.path)
    con.execute("UPDATE blocks SET top_ids = ? WHERE layer = 1", (b"\x00" * 16,))
    con.commit()
    con.close()
    with pytest.warns(IndexRebuiltWarning, match="corrupt or stale"):
        fixed = ValueIndex.load(llama, n_tokens=5, progress=False)
    assert fixed.value(1, 3) == good
    idx.path.write_bytes(b"not a database")
    with pytest.warns(IndexRebuiltWarning):
        assert ValueIndex.load(llama, n_tokens=5, progress=False).value(1, 3) == good
    with pytest.raises(FileNotFoundError, match="no index"):
        ValueIndex.load(llama, n_tokens=4, rebuild=False)


def test_interrupted_build_resumes(llama, monkeypatch):
    calls = []
    real = core.two_sided_topk

    def boom(V, B, n, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(V, B, n, **kw)

    monkeypatch.setattr(core, "two_sided_topk", boom)
    with pytest.raises(KeyboardInterrupt):
        ValueIndex.build(llama, n_tokens=7, progress=False)
    calls.clear()
    monkeypatch.setattr(core, "two_sided_topk", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    idx = ValueIndex.build(llama, n_tokens=7, progress=False)
    assert len(calls) == 1  # layer 0 came from the partial file
    dw = debug_weights(llama)
    s = dw.W_out[0, 5] @ dw.readout_basis()
    assert [x["id"] for x in idx.value(0, 5)["top"]] == torch.argsort(-s, stable=True)[:7].tolist()
