"""The compare pipeline on tiny models: bookkeeping, zero updates counted, truncation reported."""

import json
import math

import pytest
import torch

import tl_plugins
from tl_iclgd.compare import LAYER_METRICS, compare, predictions
from tl_iclgd.gd import GDConfig


def test_compare_runs_and_aggregates(llama3, make_task):
    task = make_task(n_demos=6, n_queries=8)
    before = {n: p.detach().clone() for n, p in llama3.named_parameters()}
    res = compare(llama3, task, GDConfig(lr=0.3), methods=("gd", "lcgd"), baselines=("untrained",),
                  n_demos=4, n_queries=6, seeds=(0, 1))
    assert all(torch.equal(before[n], p) for n, p in llama3.named_parameters())
    # variants x methods x seeds x layers x metrics
    assert len(res.layers) == 2 * 2 * 2 * 3 * len(LAYER_METRICS)
    agg = res.to_frame()
    assert set(agg.variant) == {"trained", "untrained"} and set(agg.method) == {"gd", "lcgd"}
    row = agg[(agg.variant == "trained") & (agg.method == "gd") & (agg.metric == "SimAOU")].iloc[0]
    per_seed = res.layers[(res.layers.variant == "trained") & (res.layers.method == "gd")
                          & (res.layers.metric == "SimAOU")].groupby("seed").value.mean()
    assert row["mean"] == pytest.approx(per_seed.mean()) and row["std"] == pytest.approx(per_seed.std())
    layer = res.to_frame("layer")
    assert len(layer[(layer.variant == "trained") & (layer.method == "gd") & (layer.metric == "SimAOU")]) == 3
    wide = res.table()
    assert list(wide.columns[:3]) == ["variant", "method", "SimAOU"] and len(wide) == 4
    runs = res.to_frame("runs")
    n_icl = runs[(runs.metric == "n_demos_icl") & (runs.variant == "trained")]["mean"].iloc[0]
    assert n_icl == 4
    assert not math.isnan(agg[agg.metric == "Kendall_tau"]["mean"].iloc[0])
    payload = json.loads(res.to_json())
    assert payload["settings"]["methods"] == ["gd", "lcgd"] and len(payload["layers"]) == len(res.layers)


def test_simam_before_matches_run_with_cache(llama3, make_task):
    # one demonstration in the pool: the seeded draw cannot reorder it, and the mean over queries
    # does not depend on their order, so the expected value is fixed by the task alone
    task = make_task(n_demos=1, n_queries=4)
    res = compare(llama3, task, GDConfig(lr=0.1), methods=("gd",), n_demos=1, n_queries=4, kendall=False)
    demo = task.demos[0].demo_tokens

    def scores(seq, n_q, layer):
        _, cache = llama3.run_with_cache(torch.tensor([list(seq)]))
        return cache[f"blocks.{layer}.attn.hook_attn_scores"][0, :, -1, -n_q:].double()  # [H, n_q]

    lay = res.layers[res.layers.metric == "SimAM_before"].set_index("layer")["value"]
    for layer in range(llama3.cfg.n_layers):
        per_query = []
        for ex in task.queries:
            q = ex.prompt
            a, b = scores(demo + q, len(q), layer), scores(q, len(q), layer)
            per_query.append(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean().item())
        # nan_ok: on the bridge leg token 3 (Hugging Face's pad id, a zero embedding) ends every query,
        # so layer 0's scores there are exactly 0 and their cosine is NaN on both sides
        assert lay[layer] == pytest.approx(sum(per_query) / len(per_query), abs=1e-5, nan_ok=True), layer


def test_zero_updates_are_counted_not_hidden(llama3, make_task):
    task = make_task(n_demos=4, n_queries=6)
    # training layer 2 only: layers 0 and 1 of the FT run equal ZSL exactly, so their updates are zero
    res = compare(llama3, task, GDConfig(lr=0.3, layers=(2,)), methods=("gd",), n_demos=4, n_queries=6,
                  kendall=False)
    lay = res.to_frame("layer")
    simaou = lay[lay.metric == "SimAOU"].set_index("layer")
    assert simaou.loc[0, "n_nan"] == 6 and simaou.loc[1, "n_nan"] == 6 and simaou.loc[2, "n_nan"] == 0
    assert math.isnan(simaou.loc[0, "mean"]) and not math.isnan(simaou.loc[2, "mean"])
    zu = res.zero_updates()
    assert set(zu.metric) >= {"SimAOU", "SimAOU_norm", "SimAM_delta"}


def test_truncation_to_context_budget_is_reported(llama3, make_task):
    task = make_task(n_demos=6, n_queries=4)
    res = compare(llama3, task, GDConfig(lr=0.1), methods=("gd",), n_demos=6, n_queries=4, context_budget=14,
                  kendall=True)
    runs = res.to_frame("runs").set_index("metric")["mean"]
    assert runs["n_demos_gd"] == 6 and 1 <= runs["n_demos_icl"] < 6


def test_enabled_config_is_the_default(llama3, make_task):
    task = make_task(n_demos=2, n_queries=2)
    with tl_plugins.enabled(llama3, "iclgd", lr=0.01, params="v"):
        res = compare(llama3, task, methods=("gd",), n_demos=2, n_queries=2, kendall=False)
    assert res.settings["lr"] == 0.01 and res.settings["params"] == "v"
    assert "iclgd" not in tl_plugins.active(llama3)


def test_predictions_closed_label_set():
    from tl_iclgd.capture import Capture

    logits = torch.zeros(2, 10)
    logits[0, 7] = 5.0  # argmax of the vocabulary, but not a label
    logits[0, 3] = 1.0
    logits[1, 4] = 2.0
    cap = Capture(torch.zeros(2, 1, 1), [], logits)
    assert predictions(cap, None).tolist() == [7, 4]
    assert predictions(cap, (3, 4)).tolist() == [3, 4]


def test_compare_bad_input(llama3, make_task):
    task = make_task()
    with pytest.raises(ValueError, match="methods: got"):
        compare(llama3, task, GDConfig(), methods=("sgd",))
    with pytest.raises(ValueError, match="baselines: got"):
        compare(llama3, task, GDConfig(), baselines=("random",))
    with pytest.raises(ValueError, match="n_demos: got 40"):
        compare(llama3, task, GDConfig(), n_demos=40)
    with pytest.raises(TypeError, match="gd: got dict"):
        compare(llama3, task, {"lr": 1})
    with pytest.raises(ValueError, match="num_threads"):
        compare(llama3, task, GDConfig(), num_threads=0)
    # the thread count set for the run is restored even when the run raises
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="methods: got"):
        compare(llama3, task, GDConfig(), methods=("sgd",), num_threads=2)
    assert torch.get_num_threads() == 1


def test_first_label_token_position_records_the_label_token(llama3, make_task):
    task = make_task(n_demos=3, n_queries=4)
    res = compare(llama3, task, GDConfig(lr=0.1), methods=("gd",), n_demos=3, n_queries=4,
                  position="first_label_token", kendall=True)
    assert res.settings["position"] == "first_label_token"
    end = compare(llama3, task, GDConfig(lr=0.1), methods=("gd",), n_demos=3, n_queries=4, kendall=False)
    a = res.to_frame().set_index("metric")["mean"]
    b = end.to_frame().set_index("metric")["mean"]
    # same predictions (read at the prompt end either way), different recorded activations
    assert a["ZSL_acc"] == b["ZSL_acc"] and a["ICL_acc"] == b["ICL_acc"]
    assert a["SimAOU"] != b["SimAOU"]
