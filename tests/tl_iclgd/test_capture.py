"""Capture against TransformerLens's own run_with_cache on the full sequence (the oracle)."""

import pytest
import torch

from tl_iclgd.capture import capture, stack_scores


@pytest.mark.parametrize("which", ["llama3", "gpt3"])
def test_prefix_cache_equals_full_forward(which, request):
    model = request.getfixturevalue(which)
    ctx = [5, 6, 7, 8, 9, 10, 11]
    queries = [[1, 2, 3], [4, 5, 6], [7, 8], [9, 3, 2, 1], [12, 13, 14]]
    a = capture(model, ctx, queries, demo_start=1, want_attn_in=True, batch_size=2)
    b = capture(model, ctx, queries, demo_start=1, want_attn_in=True, use_prefix_cache=False)
    torch.testing.assert_close(a.attn_out, b.attn_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.demo_pattern, b.demo_pattern, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.attn_in, b.attn_in, rtol=1e-4, atol=1e-5)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["llama3", "gpt3"])
def test_slices_equal_run_with_cache(which, request):
    model = request.getfixturevalue(which)
    ctx = [5, 6, 7, 8]
    q = [1, 2, 3]
    cap = capture(model, ctx, [q], demo_start=1, predict_offset=-2)
    logits, cache = model.run_with_cache(torch.tensor([ctx + q]))
    L, P, n_q = model.cfg.n_layers, len(ctx), len(q)
    for layer in range(L):
        torch.testing.assert_close(cap.attn_out[0, layer], cache[f"blocks.{layer}.hook_attn_out"][0, -1],
                                   rtol=1e-4, atol=1e-5)
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, :, -1]  # [H, K]
        torch.testing.assert_close(cap.scores[0][layer], scores[:, P:], rtol=1e-4, atol=1e-5)
        pat = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1, 1:P].mean(0)
        torch.testing.assert_close(cap.demo_pattern[0, layer], pat, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cap.logits[0], logits[0, -2], rtol=1e-4, atol=1e-5)
    assert cap.scores[0].shape == (L, model.cfg.n_heads, n_q)
    assert stack_scores(cap.scores).shape == (1, L, model.cfg.n_heads, n_q)


def test_pattern_check_catches_scores_that_are_not_pre_softmax(llama3):
    def scramble(x, hook):
        return x * 0.5  # scores edited after the softmax was taken would not match the pattern
    # run the capture with a hook that edits the pattern: softmax(scores) no longer equals it
    with llama3.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", scramble)]):
        with pytest.raises(RuntimeError, match="softmax\\(hook_attn_scores\\) differs"):
            capture(llama3, [], [[1, 2, 3]])
    # the error left no hook of ours behind
    assert all(len(hp.fwd_hooks) == 0 for hp in llama3.hook_dict.values())


def test_capture_errors(llama3):
    with pytest.raises(ValueError, match="queries: got an empty list"):
        capture(llama3, [1], [])
    with pytest.raises(ValueError, match="longer than the model's context"):
        capture(llama3, list(range(1, 120)), [[1] * 20])
