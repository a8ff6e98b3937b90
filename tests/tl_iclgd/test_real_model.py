"""SmolLM2-135M (real weights): ICL works and the pipeline runs end to end (slow)."""

import pytest

from tl_iclgd import GDConfig, Task, compare, icl_accuracy_curve, tokenize_task

pytestmark = pytest.mark.slow


def test_icl_accuracy_rises_with_demonstrations(smollm2):
    # known on this model: antonyms 0-shot 0.00, then rising to ~0.75-0.9 with 8-16 demonstrations
    curve = icl_accuracy_curve(smollm2, "antonyms", n_demos=(0, 2, 16), n_queries=20).to_frame()
    acc = dict(zip(curve.n_demos, curve.accuracy))
    assert acc[0] <= 0.1
    assert acc[2] > acc[0] + 0.2
    assert acc[16] >= acc[2] and acc[16] >= 0.6


def test_real_tokenizer_multi_token_label_error(smollm2):
    t = Task(demos=[("hot", "cold")], queries=[("Thailand", "Bangkok")])
    with pytest.raises(ValueError, match="queries\\[0\\]: label ' Bangkok' tokenises to 2 tokens"):
        tokenize_task(t, smollm2)


def test_prompt_longer_than_context_is_an_error(smollm2):
    t = Task(demos=[("hot", "cold")], queries=[("word " * 3000, "cold")])
    with pytest.raises(ValueError, match="longer than the context budget"):
        compare(smollm2, t, GDConfig(), n_demos=1, n_queries=1)


def test_small_comparison_on_real_model(smollm2):
    res = compare(smollm2, "antonyms", GDConfig(lr=0.1), n_demos=4, n_queries=6, baselines=("untrained",),
                  kendall=False)
    agg = res.to_frame().set_index(["variant", "method", "metric"])["mean"]
    assert agg[("trained", "gd", "ICL_acc")] > agg[("trained", "gd", "ZSL_acc")]
    # LCGD and GD update the same parameters, yet their activation updates differ
    assert agg[("trained", "gd", "SimAOU")] != agg[("trained", "lcgd", "SimAOU")]
    assert res.settings["n_layers"] == 30
