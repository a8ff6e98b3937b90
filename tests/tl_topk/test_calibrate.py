"""``tl_topk.calibrate``: the mass statistics against brute force on the cached patterns, the rules'
k against their definitions, and the result against a perplexity measured independently."""

from __future__ import annotations

import math

import pytest
import torch

import tl_plugins
from tl_topk.analysis import perplexity
from tl_topk.calibrate import RULES, THRESHOLDS, attention_mass, calibrate, rule_k


@pytest.fixture
def calib_tokens():
    return torch.randint(4, 90, (2, 32), generator=torch.Generator().manual_seed(11))


def test_attention_mass_equals_brute_force_on_cached_patterns(llama, calib_tokens):
    curve, need = attention_mass(llama, calib_tokens, block=5)  # several row blocks
    _, cache = llama.run_with_cache(calib_tokens)
    for layer in range(llama.cfg.n_layers):
        pat = cache["pattern", layer].double()  # [b, h, q, k]
        for j in (1, 3, 8, 32):
            mass = pat.topk(j, dim=-1).values.sum(-1).mean((0, 2))
            torch.testing.assert_close(curve[layer, :, j - 1], mass, atol=1e-6, rtol=0)
        for i in (0, 5, len(THRESHOLDS) - 1):
            t = THRESHOLDS[i]
            # keys a row needs: the smallest j with top-j mass >= t, by a loop over j
            rows = pat.reshape(-1, pat.shape[1], pat.shape[2], pat.shape[3])
            sorted_ = rows.sort(-1, descending=True).values.cumsum(-1)
            needed = torch.full(sorted_.shape[:-1], float(pat.shape[-1]), dtype=torch.float64)
            for j in range(pat.shape[-1], 0, -1):
                needed = torch.where(sorted_[..., j - 1] >= t - 1e-9, torch.full_like(needed, j), needed)
            torch.testing.assert_close(need[layer, :, i], needed.mean((0, 2)), atol=1e-6, rtol=0)


def test_rules_give_the_k_their_definitions_say(llama, calib_tokens):
    curve, need = attention_mass(llama, calib_tokens)
    n = calib_tokens.shape[1]
    for i, t in enumerate(THRESHOLDS):
        k = rule_k(curve, need, "mass", i)
        for layer in range(k.shape[0]):
            for head in range(k.shape[1]):
                kk = int(k[layer, head])
                assert curve[layer, head, kk - 1] >= t - 1e-9 or kk == n
                assert kk == 1 or curve[layer, head, kk - 2] < t - 1e-9
        assert torch.equal(rule_k(curve, need, "top-p", i), need[..., i].ceil().long())


def test_calibrate_result_is_what_enable_measures(llama, calib_tokens):
    dense = perplexity(llama, calib_tokens)
    result = calibrate(llama, calib_tokens, budget=0.02)
    assert tl_plugins.active(llama) == {}
    assert set(result.by_rule) == set(RULES)
    assert result.dense_perplexity == pytest.approx(dense, rel=1e-12)
    with tl_plugins.enabled(llama, "topk", k=result.k):
        got = perplexity(llama, calib_tokens)
    assert got == pytest.approx(result.perplexity, rel=1e-9)
    assert result.met and got <= dense * 1.02
    n = calib_tokens.shape[1]
    df = result.to_frame()
    assert len(df) == llama.cfg.n_layers * llama.cfg.n_heads
    ks = [n if k is None or (isinstance(k, float) and math.isnan(k)) else int(k) for k in df["k"]]
    assert result.mean_k == pytest.approx(sum(ks) / len(ks))
    assert {(int(r.layer), int(r.head)): int(r.k) for r in df.itertuples() if not (r.k is None or r.k != r.k)} \
        == result.k
    # nothing tried that met the budget used fewer keys than the winner
    assert all(row["mean_k"] >= result.mean_k - 1e-9 for row in result.tried if row["met"])
    assert result.mean_k < n  # a 2 % budget lets some heads drop keys


def test_a_loose_budget_keeps_fewer_keys_than_a_tight_one(llama, calib_tokens):
    loose = calibrate(llama, calib_tokens, budget=0.5, rule="mass")
    tight = calibrate(llama, calib_tokens, budget=0.001, rule="mass")
    assert loose.mean_k < tight.mean_k
    assert loose.rule == tight.rule == "mass" and set(loose.by_rule) == {"mass"}


def test_bad_input(llama, calib_tokens):
    with pytest.raises(ValueError, match="budget: got 0"):
        calibrate(llama, calib_tokens, budget=0)
    with pytest.raises(ValueError, match="budget: got nan"):
        calibrate(llama, calib_tokens, budget=float("nan"))
    with pytest.raises(ValueError, match="rule: got 'p'"):
        calibrate(llama, calib_tokens, rule="p")
    with pytest.raises(TypeError, match="tokens: got Tensor"):
        calibrate(llama, calib_tokens.float())
    with pytest.raises(ValueError, match="tokens: got 1 positions"):
        calibrate(llama, calib_tokens[:, :1])
    with tl_plugins.enabled(llama, "topk", k=4):
        with pytest.raises(ValueError, match="topk is already enabled"):
            calibrate(llama, calib_tokens)
