"""Figures for the docs on Gemma 3 270M (and SmolLM2 beside it): ``python scripts/gemma_figures.py [MODEL]``.

Prints JSON lines: top-k perplexity vs k, embedspace timings (filtered and unfiltered exact top-k),
iclgd antonyms comparison and ICL accuracy curve. Measured on whatever CPU runs it; quote medians.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import tl_plugins


def emit(**kw):
    print(json.dumps(kw, default=str), flush=True)


def main(name: str = "gemma3-270m", parts: str = "topk,embedspace,iclgd") -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = tl_plugins.models.load(name)
    emit(model=name, load_s=round(time.perf_counter() - t0, 1), backend=type(model).__name__)
    if "topk" in parts:
        from tl_topk.analysis import docs_tokens, perplexity_sweep

        tokens = docs_tokens(model, 1024)
        t = time.perf_counter()
        sweep = perplexity_sweep(model, tokens, [8, 32, 128, "n"], modes=("attention",), model_name=name)
        emit(part="topk-1024-attention", dense=sweep.dense, rows=sweep.rows, s=round(time.perf_counter() - t, 1))
        tokens = docs_tokens(model, 256)
        t = time.perf_counter()
        sweep = perplexity_sweep(model, tokens, [4, 8, 16, 32, 64, 128, "n"], model_name=name)
        emit(part="topk-256", dense=sweep.dense, rows=sweep.rows, s=round(time.perf_counter() - t, 1))
    if "embedspace" in parts:
        from tl_embedspace.space import EmbeddingSpace

        for filt in ("corpus", None):
            sp = EmbeddingSpace(model, filters=filt)
            t = time.perf_counter()
            sc = sp.copying_scores()
            cs = time.perf_counter() - t
            l, h = divmod(int(sc.flatten().argmax()), sp.n_heads)
            times = []
            for _ in range(2 if filt is None else 3):
                t = time.perf_counter()
                df = sp.ov(l, h).topk_pairs(100).to_frame()
                times.append(time.perf_counter() - t)
            emit(part="embedspace", filter=sp.basis["filter"], copying_s=round(cs, 1), head=f"L{l}H{h}",
                 top100_s=[round(x, 2) for x in times],
                 pairs=list(zip(df.row_token[:12], df.col_token[:12])),
                 late_values={f"L{sp.n_layers - 1}N{n}": sp.ff_value(sp.n_layers - 1, n, k=8).top_tokens
                              for n in range(3)})
    if "iclgd" in parts:
        import tl_iclgd

        t = time.perf_counter()
        curve = tl_iclgd.icl_accuracy_curve(model, "antonyms", n_demos=(0, 1, 2, 4, 8, 16), n_queries=20)
        emit(part="icl-curve", rows=curve.to_frame().to_dict("records"), s=round(time.perf_counter() - t, 1))
        t = time.perf_counter()
        res = tl_iclgd.compare(model, "antonyms", tl_iclgd.GDConfig(lr=0.1), methods=("gd", "lcgd"), n_demos=16,
                               n_queries=50, seeds=(0,), baselines=("untrained",), num_threads=2)
        emit(part="iclgd-antonyms", table=res.table().to_dict("records"), s=round(time.perf_counter() - t, 1))


if __name__ == "__main__":
    main(*sys.argv[1:])
