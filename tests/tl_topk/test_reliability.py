"""Bad and unusual input to top-k: one rule for every backend, validation at the boundary.

Non-finite q/k/v and non-finite or non-positive scale/soft-cap are refused by every backend with an
error naming the argument (``auto`` picks a backend by length, so a per-backend rule would change
with n); empty batches and empty sequences give empty outputs, as the unmodified model does; numpy
scalars are accepted where Python numbers are; options that would change nothing are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_plugins
from tl_topk import topk_attention
from tl_topk.config import TopKConfig

BACKENDS = ["dense", "chunked", "auto"]


def _qkv(b=1, n=8, h=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, h, d, generator=g), torch.randn(b, n, h, d, generator=g),
            torch.randn(b, n, h, d, generator=g))


@pytest.mark.parametrize("backend", BACKENDS + ["flex"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_by_every_backend(backend, which, bad):
    q, k, v = _qkv()
    {"q": q, "k": k, "v": v}[which][0, 3, 1, 2] = bad
    with pytest.raises(ValueError, match=rf"^{which}: contains NaN or infinite values"):
        topk_attention(q, k, v, 2, causal=True, backend=backend)


@pytest.mark.parametrize("arg", ["scale", "softcap"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, True, "1"])
def test_non_finite_or_non_positive_scale_and_softcap_are_refused(arg, bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"^{arg}: got .*finite positive number"):
        topk_attention(q, k, v, 2, causal=True, **{arg: bad})


def test_numpy_scalars_are_accepted_like_python_numbers():
    q, k, v = _qkv()
    want = topk_attention(q, k, v, 3, causal=True, scale=0.5, softcap=5.0, backend="dense")
    got = topk_attention(q, k, v, np.int64(3), causal=True, scale=np.float32(0.5), softcap=np.float64(5.0),
                         backend="dense")
    torch.testing.assert_close(got, want)
    assert TopKConfig(k=np.int64(4), layers=[np.int64(0)], chunk_size=np.int32(8)).attention_spec(0, 2) == (4, 4)


def test_zero_head_size_is_refused():
    q, k, v = (torch.zeros(1, 4, 2, 0) for _ in range(3))
    with pytest.raises(ValueError, match="d_head is 0"):
        topk_attention(q, k, v, 2, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0)])
def test_empty_batch_and_sequence_give_empty_output(backend, shape):
    b, n = shape
    q, k, v = (torch.randn(b, n, 2, 4) for _ in range(3))
    z = topk_attention(q, k, v, 2, causal=True, backend=backend)
    assert z.shape == (b, n, 2, 4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_empty_batch_through_the_model_works_as_without_the_plugin(name):
    model = tl_plugins.models.load(name)
    tokens = torch.zeros(0, 6, dtype=torch.long)
    try:
        ref = model(tokens)
    except Exception as exc:  # transformer-lens 4.3's bridge itself fails on an empty batch
        with tl_plugins.enabled(model, "topk", k=2, backend="chunked"), pytest.raises(type(exc)):
            model(tokens)
        return
    with tl_plugins.enabled(model, "topk", k=2, backend="chunked"):
        out = model(tokens)
    assert out.shape == ref.shape == (0, 6, model.cfg.d_vocab)


@pytest.mark.parametrize("options, match", [
    (dict(k=2, layers=[]), "layers: got \\[\\], which selects no layer"),
    (dict(k={1: 2}, layers=[0]), "k: gives k only for layers \\[1\\], none of which layers=\\[0\\] selects"),
    (dict(ff_k={1: 8}, layers=[0]), "ff_k: gives k only for layers \\[1\\]"),
    (dict(k=2, memory_budget_mb=float("inf")), "memory_budget_mb: got inf"),
    (dict(k=2, memory_budget_mb=True), "memory_budget_mb: got True"),
    (dict(k=2, memory_budget_mb=float("nan")), "memory_budget_mb: got nan"),
    (dict(k=2, chunk_size=0), "chunk_size: got 0"),
    (dict(k=2, chunk_size=-3), "chunk_size: got -3"),
])
def test_options_that_change_nothing_or_cannot_work_are_refused_before_the_model_is_touched(options, match):
    model = tl_plugins.models.load("tiny-llama")
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        tl_plugins.enable(model, "topk", **options)
    assert tl_plugins.active(model) == {}
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == before
