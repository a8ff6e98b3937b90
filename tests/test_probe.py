"""The reliability probe: bad or unusual input to every public entry point, each checked three ways.

1. the outcome is the documented one: a clear error (the expected exception type, the message
   starting with the argument's name, as every error of this project does: "k: got 0; accepted: ..."),
   or, for unusual-but-valid input, a correct result checked against an oracle;
2. the model is unchanged (every parameter and buffer bit for bit, every module's instance
   attributes by name and identity, no plugin left enabled);
3. no file appeared in the working folder.

docs/reliability.md reports the counts; the command-line cases are in tests/tl_plugins/test_cli_probe.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import tl_plugins
from tl_embedspace import EmbeddingSpace, topk_per_row, topk_product
from tl_plugins.errors import TLPluginsError
from tl_topk import TopKConfig, topk_activation, topk_attention


@dataclass
class Case:
    entry: str                       # the public entry point
    call: Callable[[Any], Any]       # ctx -> result (ctx has .model, .space)
    error: Optional[tuple] = None    # expected exception types; None: must succeed
    names: Optional[str] = None      # regex the message must start with (the argument)
    check: Optional[Callable[[Any, Any], None]] = None  # (ctx, result) oracle for successes


class Ctx:
    def __init__(self, model):
        self.model = model
        self.space = EmbeddingSpace(model)


def _qkv(n=6, h=2, d=4, b=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, n, h, d, generator=g) for _ in range(3)]


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


BAD_K = [0, -1, 1.5, "3", True, float("nan"), float("inf"), None]
TOPK_ERR = (ValueError, TypeError)

CASES: list[Case] = []
# -- tl_plugins.enable / disable / weights ----------------------------------------------------------
CASES += [
    Case("enable(name)", lambda c: tl_plugins.enable(c.model, "nope"), (TLPluginsError,), "name: unknown plugin"),
    Case("enable(name)", lambda c: tl_plugins.enable(c.model, 3), (TypeError,), "name:"),
    Case("enable(option)", lambda c: tl_plugins.enable(c.model, "topk", kk=3), (TypeError,), r"enable\('topk'\)"),
    Case("enable(model)", lambda c: tl_plugins.enable(torch.nn.Linear(2, 2), "topk", k=2), (TLPluginsError,),
         "model:"),
    Case("disable(name)", lambda c: tl_plugins.disable(c.model, "topk"), (TLPluginsError,), "name:"),
    Case("disable(name)", lambda c: tl_plugins.disable(c.model, "nope"), (TLPluginsError,), "name:"),
    Case("weights(model)", lambda c: tl_plugins.weights(object()), (TLPluginsError,), "model:"),
    Case("WeightView.W_Q_layer", lambda c: tl_plugins.weights(c.model).W_Q_layer(99), (IndexError,), "layer:"),
    Case("WeightView.W_Q_layer", lambda c: tl_plugins.weights(c.model).W_Q_layer(-1), (IndexError,), "layer:"),
    Case("WeightView.W_Q_layer", lambda c: tl_plugins.weights(c.model).W_Q_layer(True), (IndexError,), "layer:"),
    Case("WeightView.W_Q_layer(numpy)", lambda c: tl_plugins.weights(c.model).W_Q_layer(np.int64(1)),
         check=lambda c, r: torch.testing.assert_close(r, tl_plugins.weights(c.model).W_Q_layer(1))),
    Case("models.load(name)", lambda c: tl_plugins.models.load("nope"), (TLPluginsError,), "name: unknown model"),
    Case("models.load(backend)", lambda c: tl_plugins.models.load("tiny-gpt2", backend="x"), (ValueError,),
         "backend:"),
    Case("models.load(processed)", lambda c: tl_plugins.models.load("smollm2-135m", processed="no"), (TypeError,),
         "processed:"),
    Case("models.load(n_ctx)", lambda c: tl_plugins.models.load("smollm2-135m", n_ctx=0), (ValueError,), "n_ctx:"),
]
# -- topk options through enable ------------------------------------------------------------------------
for bad in BAD_K:
    if bad is None:
        continue
    CASES.append(Case(f"enable(topk, k={bad!r})", lambda c, bad=bad: tl_plugins.enable(c.model, "topk", k=bad),
                      TOPK_ERR, "k"))
    CASES.append(Case(f"enable(topk, ff_k={bad!r})",
                      lambda c, bad=bad: tl_plugins.enable(c.model, "topk", ff_k=bad), TOPK_ERR, "ff_k"))
CASES += [
    Case("enable(topk, nothing)", lambda c: tl_plugins.enable(c.model, "topk"), (ValueError,), "k:"),
    Case("enable(topk, k={99: 2})", lambda c: tl_plugins.enable(c.model, "topk", k={99: 2}), (ValueError,), "k:"),
    Case("enable(topk, k={(0, 99): 2})", lambda c: tl_plugins.enable(c.model, "topk", k={(0, 99): 2}),
         (ValueError,), "k:"),
    Case("enable(topk, layers=[])", lambda c: tl_plugins.enable(c.model, "topk", k=2, layers=[]), (ValueError,),
         "layers:"),
    Case("enable(topk, layers=[9])", lambda c: tl_plugins.enable(c.model, "topk", k=2, layers=[9]), (ValueError,),
         "layers:"),
    Case("enable(topk, layers='0')", lambda c: tl_plugins.enable(c.model, "topk", k=2, layers="0"), (TypeError,),
         "layers:"),
    Case("enable(topk, backend)", lambda c: tl_plugins.enable(c.model, "topk", k=2, backend="gpu"), (ValueError,),
         "backend:"),
    Case("enable(topk, ff_rule)", lambda c: tl_plugins.enable(c.model, "topk", ff_k=2, ff_rule="x"), (ValueError,),
         "ff_rule:"),
    Case("enable(topk, chunk_size=0)", lambda c: tl_plugins.enable(c.model, "topk", k=2, chunk_size=0),
         (ValueError,), "chunk_size:"),
    Case("enable(topk, memory_budget_mb=inf)",
         lambda c: tl_plugins.enable(c.model, "topk", k=2, memory_budget_mb=math.inf), (ValueError,),
         "memory_budget_mb:"),
    Case("enable(topk, k given for unselected layers)",
         lambda c: tl_plugins.enable(c.model, "topk", k={1: 2}, layers=[0]), (ValueError,), "k:"),
    Case("enable(topk, numpy k)", lambda c: tl_plugins.enabled(c.model, "topk", k=np.int64(2)).__enter__(),
         check=lambda c, r: (tl_plugins.disable(c.model), None)[1]),
    Case("TopKConfig(k={0: [2, 'x']})", lambda c: TopKConfig(k={0: [2, "x"]}), TOPK_ERR, r"k\[0\]\[1\]"),
]
# -- topk functional op ------------------------------------------------------------------------------
q, k, v = _qkv()
for name in ("q", "k", "v"):
    CASES.append(Case(f"topk_attention({name} NaN)", lambda c, name=name: topk_attention(
        *[_nan(t) if n == name else t for n, t in zip("qkv", (q, k, v))], 2, causal=True), (ValueError,), name))
    CASES.append(Case(f"topk_attention({name} 3-d)", lambda c, name=name: topk_attention(
        *[t[0] if n == name else t for n, t in zip("qkv", (q, k, v))], 2, causal=True), (ValueError,), name))
    CASES.append(Case(f"topk_attention({name} int)", lambda c, name=name: topk_attention(
        *[t.long() if n == name else t for n, t in zip("qkv", (q, k, v))], 2, causal=True), (TypeError,), name))
for bad in BAD_K:
    CASES.append(Case(f"topk_attention(k_top={bad!r})", lambda c, bad=bad: topk_attention(q, k, v, bad, causal=True),
                      TOPK_ERR, "k"))
for arg in ("scale", "softcap"):
    for bad in (0, -1, math.nan, math.inf, True):
        CASES.append(Case(f"topk_attention({arg}={bad!r})", lambda c, arg=arg, bad=bad: topk_attention(
            q, k, v, 2, causal=True, **{arg: bad}), (ValueError,), arg))
CASES += [
    Case("topk_attention(backend)", lambda c: topk_attention(q, k, v, 2, causal=True, backend="x"), (ValueError,),
         "backend:"),
    Case("topk_attention(window=0)", lambda c: topk_attention(q, k, v, 2, causal=True, window=0), (ValueError,),
         "window:"),
    Case("topk_attention(window, causal=False)", lambda c: topk_attention(q, k, v, 2, causal=False, window=2),
         (ValueError,), "window:"),
    Case("topk_attention(mask shape)", lambda c: topk_attention(q, k, v, 2, causal=True,
                                                             key_padding_mask=torch.ones(1, 3)), (ValueError, TypeError),
         "key_padding_mask:"),
    Case("topk_attention(mask float)", lambda c: topk_attention(q, k, v, 2, causal=True,
                                                             key_padding_mask=torch.ones(1, 6)), (TypeError,),
         "key_padding_mask:"),
    Case("topk_attention(GQA mismatch)", lambda c: topk_attention(q, k[:, :, :1].repeat(1, 1, 3, 1)[:, :, :3],
                                                               v[:, :, :1].repeat(1, 1, 3, 1)[:, :, :3], 2,
                                                               causal=True), (ValueError,), "k:"),
    Case("topk_attention(empty batch)", lambda c: topk_attention(*(t[:0] for t in (q, k, v)), 2, causal=True),
         check=lambda c, r: r.shape == (0, 6, 2, 4) or pytest.fail(str(r.shape))),
    Case("topk_attention(k > n)", lambda c: topk_attention(q, k, v, 100, causal=True),
         check=lambda c, r: torch.testing.assert_close(r, topk_attention(q, k, v, 6, causal=True))),
    Case("topk_activation(rule)", lambda c: topk_activation(torch.randn(2, 8), 2, torch.relu, rule="x"),
         (ValueError,), "rule:"),
]
# -- embedspace ----------------------------------------------------------------------------------------
CASES += [
    Case("EmbeddingSpace(model)", lambda c: EmbeddingSpace(object()), (TLPluginsError,), "model:"),
    Case("EmbeddingSpace(read_basis)", lambda c: EmbeddingSpace(c.model, read_basis="x"), (ValueError,),
         "read_basis:"),
    Case("EmbeddingSpace(write_basis)", lambda c: EmbeddingSpace(c.model, write_basis="x"), (ValueError,),
         "write_basis:"),
    Case("EmbeddingSpace(ln)", lambda c: EmbeddingSpace(c.model, ln="x"), (ValueError,), "ln:"),
    Case("EmbeddingSpace(budget_bytes)", lambda c: EmbeddingSpace(c.model, budget_bytes=0), (ValueError,),
         "budget_bytes:"),
    Case("EmbeddingSpace(budget_bytes=inf)", lambda c: EmbeddingSpace(c.model, budget_bytes=math.inf),
         (ValueError,), "budget_bytes:"),
    Case("EmbeddingSpace(filters)", lambda c: EmbeddingSpace(c.model, filters="nope"), (ValueError, TypeError),
         "filters"),
]
for method, args in (("ff_value", (99, 0)), ("ff_value", (0, 99999)), ("ff_key", (-1, 0)), ("ff_value", (0.5, 0)),
                     ("ov", (0, 99)), ("qk", (99, 0)), ("head_vector", (0, 0, "X", 0)),
                     ("head_vector", (0, 0, "Q", 999)), ("embedding", (10**9,)), ("unembedding", (-5,))):
    CASES.append(Case(f"EmbeddingSpace.{method}{args}", lambda c, m=method, a=args: getattr(c.space, m)(*a),
                      (IndexError, ValueError, TypeError, TLPluginsError), r"(layer|neuron|head|which|index|token)"))
for bad in (0, -2, 1.5, True):
    CASES.append(Case(f"ff_value(k={bad!r})", lambda c, bad=bad: c.space.ff_value(0, 0, k=bad), (ValueError,), "k:"))
    CASES.append(Case(f"topk_pairs(k={bad!r})", lambda c, bad=bad: c.space.ov(0, 0).topk_pairs(bad), (ValueError,),
                      "k:"))
CASES += [
    Case("topk_pairs(mode)", lambda c: c.space.ov(0, 0).topk_pairs(3, "x"), (ValueError,), "mode:"),
    Case("topk_pairs(exclude_diagonal='yes')", lambda c: c.space.ov(0, 0).topk_pairs(3, exclude_diagonal="yes"),
         (TypeError,), "exclude_diagonal:"),
    Case("topk_per_row(exclude_diagonal=1)", lambda c: c.space.ov(0, 0).topk_per_row(3, exclude_diagonal=1),
         (TypeError,), "exclude_diagonal:"),
    Case("sweep(heads='no')", lambda c: __import__("tl_embedspace.sweep", fromlist=["sweep"]).sweep(
        c.space, "out", heads="no", progress=False), (TypeError,), "heads:"),
    Case("topk_pairs(k > vocab^2)", lambda c: c.space.ov(0, 0).topk_pairs(10**6),
         check=lambda c, r: len(r.values) == c.space.d_vocab ** 2 or pytest.fail(str(len(r.values)))),
    Case("find_neurons(kind)", lambda c: c.space.find_neurons(5, kind="x"), (ValueError, TLPluginsError), "kind:"),
    Case("find_heads(kind)", lambda c: c.space.find_heads(5, 6, kind="x"), (ValueError,), "kind:"),
    Case("project(shape)", lambda c: c.space.project(torch.randn(3)), (ValueError,), "vector:"),
    Case("project(side)", lambda c: c.space.project(torch.randn(c.space.w.d_model), side="x"), (ValueError,), "side:"),
    Case("project(NaN)", lambda c: c.space.project(_nan(torch.randn(c.space.w.d_model))), (ValueError,), "vector:"),
    Case("topk_product(NaN)", lambda c: topk_product(_nan(torch.randn(5, 3)), torch.randn(3, 5), 2), (ValueError,),
         "A"),
    Case("topk_product(shapes)", lambda c: topk_product(torch.randn(5, 3), torch.randn(4, 5), 2), (ValueError,),
         r"(A|B)"),
    Case("topk_per_row(budget)", lambda c: topk_per_row(torch.randn(5, 3), torch.randn(3, 5), 2, budget_bytes=0),
         (ValueError,), "budget_bytes:"),
]


def _snapshot(model):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    attrs = {n: {k: id(x) for k, x in vars(m).items() if not isinstance(x, torch.Tensor)}
             for n, m in model.named_modules()}
    return params, buffers, attrs


def _same(a, b):
    pa, ba, aa = a
    pb, bb, ab = b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa), "a parameter changed"
    assert ba.keys() == bb.keys() and all(torch.equal(ba[n], bb[n]) for n in ba), "a buffer changed"
    assert aa == ab, "a module's attributes changed"


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def ctx(request):
    return Ctx(tl_plugins.models.load(request.param))


OUTCOMES: dict[str, int] = {}


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c.entry}" for i, c in enumerate(CASES)])
def test_probe(ctx, case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(ctx.model)
    if case.error is None:
        result = case.call(ctx)
        if case.check is not None:
            case.check(ctx, result)
        kind = "behaved right"
    else:
        with pytest.raises(case.error) as info:
            case.call(ctx)
        message = str(info.value)
        assert case.names is None or re.match(case.names, message), \
            f"the message does not start with the argument ({case.names}): {message!r}"
        assert "Traceback" not in message
        kind = "clear error"
    assert tl_plugins.active(ctx.model) == {}
    _same(before, _snapshot(ctx.model))
    assert os.listdir(tmp_path) == [], f"stray files: {os.listdir(tmp_path)}"
    OUTCOMES[kind] = OUTCOMES.get(kind, 0) + 1
