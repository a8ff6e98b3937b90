"""The web app: its JSON API against the library (Starlette's test client), and the page in a
real headless Chromium (tl_plugins.browser): type a prompt, trace, open a value, add an
intervention from the trace, generate, compare with the library; bad requests show an error on
the page. A screenshot is kept under the test's tmp folder (its path is printed)."""

from __future__ import annotations

import pytest

import tl_plugins
from tl_embedspace import debugger
from tl_embedspace.debugger.app import DebuggerState, PortInUseError, Server, bind, make_app
from tl_plugins import browser

PROMPT = "w5 w9 w13 w7 w22"


@pytest.fixture(scope="module")
def model(llama_models):
    return llama_models.get("bridge")


@pytest.fixture()
def state(model, tmp_path):
    idx = debugger.ValueIndex.build(model, n_tokens=10, folder=tmp_path / "ix", progress=False)
    return DebuggerState(model, "tiny-llama", index=idx)


def _hook_count(model):
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def test_api(state, model):
    from starlette.testclient import TestClient

    c = TestClient(make_app(state))
    assert c.get("/").status_code == 200 and "LM-Debugger" in c.get("/").text
    assert c.get("/static/app.js").status_code == 200
    info = c.get("/api/info").json()
    assert info["index"]["ready"] and info["n_layers"] == 2
    r = c.post("/api/trace", json={"prompt": PROMPT, "k": 3}).json()
    lib = debugger.trace(model, PROMPT, k=3)
    assert [u["label"] for u in r["sub_updates"]] == lib.sub_updates.label.tolist()
    v = c.get("/api/value/L1U3", params={"prompt": PROMPT}).json()
    assert [t["id"] for t in v["top"]] == state.index.value(1, 3, n=20)["top"] and False or \
        [t["id"] for t in v["top"]] == [t["id"] for t in state.index.value(1, 3, n=20)["top"]]
    assert len(v["activations"]) == 5
    s = c.post("/api/search", json={"tokens": "w9|w13", "k": 4}).json()
    assert [x["label"] for x in s["rows"]] == state.index.search(["w9", "w13"], k=4).label.tolist()
    ivs = [{"layer": 1, "unit": 3, "op": "set", "value": 4.0, "positions": "all", "enabled": True}]
    g = c.post("/api/generate", json={"prompt": PROMPT, "interventions": ivs, "max_new_tokens": 4}).json()
    assert g["steered"] == debugger.generate(model, PROMPT, ivs, max_new_tokens=4)["steered"]
    for bad, msg in [({"prompt": ""}, "prompt"), ({"prompt": PROMPT, "target": "w5 w6"}, "not a single token"),
                     ({"prompt": PROMPT, "k": "x"}, "k: got")]:
        res = c.post("/api/trace", json=bad)
        assert res.status_code == 400 and msg in res.json()["error"]
    assert "unit: got 999" in c.get("/api/value/L1U999").json()["error"]
    assert "accepted: 'L<layer>U<unit>'" in c.get("/api/value/banana").json()["error"]
    res = c.post("/api/generate", json={"prompt": PROMPT, "interventions": [{"layer": 5, "unit": 0}]})
    assert res.status_code == 400 and "layer: got 5" in res.json()["error"]
    assert c.get("/api/nothing").status_code == 404
    assert _hook_count(model) == 0 and tl_plugins.active(model) == {}


def test_port_in_use():
    s = bind("127.0.0.1", 0)
    port = s.getsockname()[1]
    try:
        with pytest.raises(PortInUseError, match=rf"port {port} on 127.0.0.1 is in use.*--port"):
            bind("127.0.0.1", port)
    finally:
        s.close()


@pytest.mark.skipif(browser.unavailable_reason() is not None, reason=str(browser.unavailable_reason()))
def test_in_a_real_browser(state, model, tmp_path):
    server = Server(make_app(state), bind("127.0.0.1", 0)).start()
    shot = tmp_path / "debugger-app.png"
    try:
        with browser.chromium() as b:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url)
            page.wait_for_selector("body[data-index=ready]")
            page.fill("#prompt", PROMPT)
            page.fill("#k", "3")
            page.click("#trace-btn")
            page.wait_for_selector("#layers-table")
            lib = debugger.trace(model, PROMPT, k=3)
            rows = page.query_selector_all("#layers-table tbody tr")
            assert len(rows) == 2
            for row, L in zip(rows, lib.layers.itertuples()):
                assert row.query_selector(".post-rank").inner_text().startswith(str(L.post_rank))
                shown = [e.get_attribute("data-label") for e in row.query_selector_all(".sub")]
                assert shown == lib.sub_updates[lib.sub_updates.layer == L.layer].label.tolist()[:4]
            first = lib.sub_updates.label.iloc[-1]
            page.click(f"#layers-table a.unit-link[data-label={first}]")
            page.wait_for_selector(f"#value-details[data-label={first}]")
            lay, unit = debugger.parse_unit(first)
            want = [t["token"] for t in state.index.value(lay, unit, n=20)["top"]]
            got = [e.inner_text() for e in page.query_selector_all("#value-top .tok")]
            assert got == [t.replace(" ", "\u2423") for t in want]
            assert len(page.query_selector_all("#value-acts tr")) == 6
            page.click(f"#layers-table .sub[data-label={first}] button.add-iv")
            page.fill("#iv-list tr .iv-value", "6")
            page.dispatch_event("#iv-list tr .iv-value", "change")
            page.fill("#gen-n", "5")
            page.fill("#gen-prompt", PROMPT)
            page.click("#gen-btn")
            page.wait_for_function("document.getElementById('gen-steered').dataset.text !== undefined")
            ivs = [{"layer": lay, "unit": unit, "op": "set", "value": 6.0, "positions": "all"}]
            res = debugger.generate(model, PROMPT, ivs, max_new_tokens=5)
            assert page.get_attribute("#gen-steered", "data-text") == res["steered"]["text"]
            assert page.get_attribute("#gen-plain", "data-text") == res["plain"]["text"]
            # bad requests: an error on the page, never a blank page
            page.fill("#target", "w5 w6")
            page.click("#trace-btn")
            page.wait_for_selector("#error:not([hidden])")
            assert "not a single token" in page.inner_text("#error")
            assert page.query_selector("#layers-table") is not None
            page.fill("#value-label", "L9U1")
            page.click("#value-btn")
            page.wait_for_function("document.getElementById('error').textContent.includes('layer: got 9')")
            page.screenshot(path=str(shot), full_page=True)
    finally:
        server.stop()
    print(f"\nscreenshot artifact: {shot}")
    assert shot.stat().st_size > 10_000
    assert _hook_count(model) == 0 and tl_plugins.active(model) == {}


def test_cli_port_in_use_and_report_section(model):
    from click.testing import CliRunner

    from tl_embedspace.debugger.report import report_section
    from tl_plugins.cli import build_cli

    s = bind("127.0.0.1", 0)
    try:
        r = CliRunner().invoke(build_cli(), ["debug", "--model", "tiny-llama", "--port", str(s.getsockname()[1])])
    finally:
        s.close()
    assert r.exit_code != 0 and "is in use" in r.output and "--port N" in r.output

    class Report:
        quick, sections = True, []

        def add_section(self, title, **kw):
            self.sections.append((title, kw))

    rep = Report()
    rep.model = model
    report_section(rep)
    title, kw = rep.sections[0]
    assert "LM-Debugger" in title and len(kw["tables"][0]) == 2
