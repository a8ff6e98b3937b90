"""``tl-plugins bench debugger``: a trace of a 32-token prompt against one ``run_with_cache`` of it
(the ratio, measured in the same run), the value index of every FFN value (time and peak extra
memory over the loaded model), a token search, and a trace round trip through the web app (HTTP on
localhost, JSON decoded)."""

from __future__ import annotations

import gc
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from tl_plugins.bench import BenchResult, device_description
from tl_plugins.measure import PeakMemory, median_time

TEXT = ("The capital of France is Paris, and the capital of Italy is Rome. Both cities are famous for their "
        "museums, their food and their long history, which draws millions of visitors every year.")


def bench_debugger(*, quick: bool = False, model: str = "smollm2-135m", device: str = "cpu") -> BenchResult:
    from tl_embedspace.debugger.app import DebuggerState, Server, bind, make_app
    from tl_embedspace.debugger.index import ValueIndex
    from tl_embedspace.debugger.model import debug_weights
    from tl_embedspace.debugger.trace import trace
    from tl_plugins import backends, models

    if device != "cpu":
        raise ValueError(f"device: got {device!r}; accepted: 'cpu'")
    res = BenchResult("debugger", device=device_description(device))
    m = models.load(model)
    be = backends.detect(m)
    toks = be.to_tokens(TEXT)[:, :32]
    n = toks.shape[1]
    reps = 3 if quick else 7
    debug_weights(m)  # weight view cached once per model, as in the web app

    # 2. the index first (the trace then reads promoted tokens from it, as the web app does)
    folder = Path(tempfile.mkdtemp(prefix="tl-debugger-bench-"))
    gc.collect()
    with PeakMemory("cpu") as peak:
        t0 = time.perf_counter()
        idx = ValueIndex.build(m, folder=folder, progress=False)
        build_s = time.perf_counter() - t0
    mb = peak.peak_extra / 2**20
    res.add(measure="value index build", values=idx.n_values, seconds=round(build_s, 1),
            peak_extra_MB=round(mb, 0), target="<= 120 s, <= 512 MB")
    res.check("index build <= 2 min", build_s <= 120)
    res.check("index build <= 512 MB extra", mb <= 512)
    t0 = time.perf_counter()
    ValueIndex.load(m, folder=folder)
    res.add(measure="value index load (verified)", seconds=round(time.perf_counter() - t0, 2))

    # 1. trace vs run_with_cache, same run, interleaved
    def rwc():
        with torch.no_grad():
            m.run_with_cache(toks)

    def tr():
        trace(m, toks, k=10, index=idx)

    rwc(), tr()
    t_rwc = median_time(rwc, repeat=reps)
    t_tr = median_time(tr, repeat=reps)
    res.add(measure=f"trace, {n}-token prompt, k=10, heads", seconds=round(t_tr, 3),
            run_with_cache_s=round(t_rwc, 3), ratio=round(t_tr / t_rwc, 2), target="ratio <= 2")
    res.check("trace within 2x of run_with_cache", t_tr <= 2 * t_rwc)
    t_noidx = median_time(lambda: trace(m, toks, k=10, index=None), repeat=max(1, reps // 2))
    res.add(measure="trace without an index (promoted tokens computed)", seconds=round(t_noidx, 3),
            ratio=round(t_noidx / t_rwc, 2))

    # 3. token search
    t_s = median_time(lambda: idx.search([" Paris"], k=20), repeat=reps * 3)
    t_c = median_time(lambda: idx.concept([" Paris", " Rome", " London", " Berlin"], k=20), repeat=reps)
    res.add(measure="token search (1 token, all values, exact)", ms=round(t_s * 1e3, 1), target="< 50 ms")
    res.add(measure="concept search (4 tokens, enrichment)", ms=round(t_c * 1e3, 1))
    res.check("token search < 50 ms", t_s < 0.05)

    # 4. the web app's trace round trip
    server = Server(make_app(DebuggerState(m, model, index=idx)), bind("127.0.0.1", 0)).start()
    try:
        prompt = be.tokenizer.decode(toks[0].tolist())

        def http():
            req = urllib.request.Request(server.url + "api/trace", data=json.dumps(
                {"prompt": prompt, "k": 10}).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                json.loads(r.read())

        http()
        t_h = median_time(http, repeat=reps)
    finally:
        server.stop()
    res.add(measure="web app trace round trip (HTTP + JSON)", seconds=round(t_h, 3), target="< 2 s")
    res.check("web trace round trip < 2 s", t_h < 2.0)
    res.notes.append(f"model {model}; {n} tokens; torch threads {torch.get_num_threads()}; the index build is "
                     "measured as peak resident memory above the loaded model (the model itself is ~0.55 GB fp32)")
    return res
