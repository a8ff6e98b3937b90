// LM-Debugger front end: plain JavaScript, no libraries, served by the package (no CDN).
"use strict";
const $ = (id) => document.getElementById(id);
const VIS = { " ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d" };
const vis = (s) => String(s).replace(/[ \n\t\r]/g, (c) => VIS[c]);
const unvis = (s) => String(s).replace(/[\u2423\u21b5\u21e5\u240d]/g, (c) =>
  Object.keys(VIS).find((k) => VIS[k] === c));
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const tok = (s, cls) => `<span class="tok${cls ? " " + cls : ""}">${esc(vis(s))}</span>`;
const num = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
const signed = (x, d = 3) => `<span class="${x >= 0 ? "pos" : "neg"}">${x >= 0 ? "+" : ""}${num(x, d)}</span>`;
const state = { interventions: [], lastPrompt: null, busy: 0 };

function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = false; }
function clearError() { $("error").hidden = true; $("error").textContent = ""; }

let busyTimer = null;
async function api(path, body) {
  clearError();
  state.busy += 1; $("busy").hidden = false; const t0 = performance.now();
  if (!busyTimer) busyTimer = setInterval(() => { $("busy-time").textContent = ((performance.now() - t0) / 1000).toFixed(1); }, 100);
  try {
    const res = await fetch(path, body === undefined ? {} :
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    let data;
    try { data = await res.json(); } catch (e) { throw new Error(`server answered ${res.status} without JSON`); }
    if (!res.ok || data.error) throw new Error(data.error || `server answered ${res.status}`);
    return data;
  } catch (e) { showError(e.message || String(e)); throw e; }
  finally {
    state.busy -= 1;
    if (!state.busy) { $("busy").hidden = true; clearInterval(busyTimer); busyTimer = null; }
  }
}

async function refreshInfo() {
  try {
    const r = await fetch("/api/info"); const info = await r.json();
    $("model-info").textContent = `${info.model} (${info.backend}): ${info.n_layers} layers, d_mlp ${info.d_mlp}, ${info.n_heads} heads, vocab ${info.d_vocab}; ${info.weights}`;
    const ix = info.index;
    $("index-progress").max = Math.max(1, ix.total); $("index-progress").value = ix.done;
    $("index-text").textContent = ix.error ? `value index failed: ${ix.error}` :
      ix.ready ? `value index ready (${ix.total} values)` : `building the value index: ${ix.done} / ${ix.total}`;
    document.body.dataset.index = ix.ready ? "ready" : "building";
    if (!ix.ready && !ix.error) setTimeout(refreshInfo, 500);
  } catch (e) { setTimeout(refreshInfo, 1000); }
}

function unitLink(label) { return `<a class="unit-link" data-label="${label}">${label}</a>`; }

async function doTrace() {
  const prompt = $("prompt").value;
  const body = { prompt, target: $("target").value ? unvis($("target").value) : null,
    contrast: $("contrast").value ? unvis($("contrast").value) : null,
    position: Number($("position").value), k: Number($("k").value) };
  let r;
  try { r = await api("/api/trace", body); } catch (e) { return; }
  state.lastPrompt = prompt; state.trace = r;
  const t = r.targets[0];
  $("trace-summary").innerHTML = `<p id="trace-meta" data-seconds="${r.seconds}">tokens: ${r.tokens[0].map((s, i) => tok(s, i === t.position ? "target" : "")).join("")}
    <br>position ${t.position} (${tok(t.token)}): target ${tok(t.target)}${t.contrast !== null ? " minus " + tok(t.contrast) : ""};
    the model predicts ${tok(t.prediction)}. Direct effects through the ${esc(r.meta.norm)}. ${num(r.seconds * 1000, 0)} ms</p>`;
  let h = `<table id="layers-table"><thead><tr><th>layer</th><th>before attn</th><th>after attn</th><th>after FFN</th>
    <th>target rank (p)</th><th>top-k share of FFN norm / of target's FFN effect</th><th>dominant sub-updates: score, direct effect, promoted tokens</th><th>top heads</th></tr></thead><tbody>`;
  for (const L of r.layers) {
    const subs = r.sub_updates.filter((u) => u.layer === L.layer);
    const heads = r.heads.filter((u) => u.layer === L.layer).sort((a, b) => Math.abs(b.direct_effect) - Math.abs(a.direct_effect)).slice(0, 2);
    h += `<tr data-layer="${L.layer}"><td>${L.layer}</td><td>${L.pre_top.slice(0, 3).map((s) => tok(s)).join("")}</td>
      <td>${L.mid_top.slice(0, 3).map((s) => tok(s)).join("")}</td><td class="post-top">${L.post_top.slice(0, 3).map((s) => tok(s)).join("")}</td>
      <td class="post-rank">${L.post_rank} (${num(L.post_prob)})</td><td>${num(L.topk_norm_share, 2)} / ${num(L.topk_direct_share, 2)}</td>
      <td class="subs">${subs.slice(0, 4).map((u) => `<div class="sub" data-label="${u.label}">${unitLink(u.label)}
        <span class="score">${num(u.score)}</span> ${signed(u.direct_effect)} ${(u.top_tokens || []).slice(0, 4).map((s) => tok(s)).join("")}
        <button class="small add-iv" data-label="${u.label}" title="add an intervention on this value">+</button></div>`).join("")}</td>
      <td>${heads.map((u) => `${u.label} ${signed(u.direct_effect)}`).join("<br>")}</td></tr>`;
  }
  $("trace-out").innerHTML = h + "</tbody></table>";
  if (!$("gen-prompt").value) $("gen-prompt").placeholder = prompt;
}

async function openValue(label) {
  $("value-label").value = label;
  let d;
  const q = state.lastPrompt ? `?prompt=${encodeURIComponent(state.lastPrompt)}` : "";
  try { d = await api(`/api/value/${encodeURIComponent(label)}${q}`); } catch (e) { return; }
  let h = `<div id="value-details" data-label="${d.label}"><h3>${d.label}</h3><p>norm ${num(d.norm)}; token scores (${esc(d.basis)} basis) mean ${num(d.mean)}, std ${num(d.std)}
    <button class="small add-iv" data-label="${d.label}">+ intervention</button></p>
    <p>promotes: <span id="value-top">${d.top.map((x) => tok(x.token)).join("")}</span></p>
    <p>suppresses: <span id="value-bottom">${d.bottom.map((x) => tok(x.token)).join("")}</span></p>`;
  if (d.activations) {
    const m = Math.max(1e-9, ...d.activations.map((a) => Math.abs(a.coefficient)));
    h += `<table id="value-acts"><tr><th>token</th><th>coefficient</th><th></th></tr>${d.activations.map((a) =>
      `<tr><td>${tok(a.token)}</td><td>${num(a.coefficient)}</td><td><span class="bar ${a.coefficient < 0 ? "neg" : ""}" style="width:${(100 * Math.abs(a.coefficient) / m).toFixed(0)}px"></span></td></tr>`).join("")}</table>`;
  }
  $("value-panel").innerHTML = h + "</div>";
}

async function doSearch() {
  const tokens = $("search-tokens").value.split("|").map(unvis).filter((s) => s.length);
  let r;
  try { r = await api("/api/search", { tokens, mode: $("search-mode").value, k: Number($("search-k").value) }); } catch (e) { return; }
  $("search-out").innerHTML = `<p>tokens ${r.tokens.map((s) => tok(s)).join("")}: ${num(r.ms, 1)} ms</p>
    <table id="search-table"><tr><th>value</th><th>score</th><th>promotes</th></tr>${r.rows.map((x) =>
    `<tr><td>${unitLink(x.label)}</td><td>${num(x.score)}</td><td>${x.top_tokens.map((s) => tok(s)).join("")}</td></tr>`).join("")}</table>`;
}

function renderInterventions() {
  $("iv-list").innerHTML = state.interventions.map((iv, i) => `<tr data-i="${i}">
    <td><input type="checkbox" class="iv-toggle" ${iv.enabled ? "checked" : ""}></td>
    <td class="iv-label">L${iv.layer}U${iv.unit}</td>
    <td><select class="iv-op">${["set", "scale", "add"].map((o) => `<option ${o === iv.op ? "selected" : ""}>${o}</option>`).join("")}</select></td>
    <td><input class="iv-value" type="number" step="any" value="${iv.value}" style="width:6em"></td>
    <td><input class="iv-positions" size="8" value="${Array.isArray(iv.positions) ? iv.positions.map((x) => x === null ? "" : x).join(":") : iv.positions}"></td>
    <td><button class="small iv-remove">remove</button></td></tr>`).join("");
}

function parsePositions(s) {
  s = String(s).trim();
  if (s === "all" || s === "last") return s;
  if (/^-?\d+$/.test(s)) return Number(s);
  return s;
}

function addIntervention(label, op, value, positions) {
  const m = /^\s*L(\d+)\s*[UD](\d+)\s*$/i.exec(label || "");
  if (!m) { showError(`unit: got ${JSON.stringify(label)}; accepted: 'L<layer>U<unit>' such as 'L12U345'`); return; }
  clearError();
  state.interventions.push({ layer: Number(m[1]), unit: Number(m[2]), op: op || "set",
    value: value === undefined ? 0 : Number(value), positions: positions || "all", enabled: true });
  renderInterventions();
}

async function doGenerate() {
  const prompt = $("gen-prompt").value || state.lastPrompt || $("prompt").value;
  let r;
  try { r = await api("/api/generate", { prompt, interventions: state.interventions, max_new_tokens: Number($("gen-n").value) }); }
  catch (e) { return; }
  $("gen-steered").textContent = prompt + r.steered.text;
  $("gen-plain").textContent = prompt + r.plain.text;
  $("gen-steered").dataset.text = r.steered.text; $("gen-plain").dataset.text = r.plain.text;
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a.unit-link");
  if (a) { openValue(a.dataset.label); return; }
  const add = ev.target.closest("button.add-iv");
  if (add) { addIntervention(add.dataset.label, "set", 0, "all"); return; }
  const rm = ev.target.closest("button.iv-remove");
  if (rm) { state.interventions.splice(Number(rm.closest("tr").dataset.i), 1); renderInterventions(); }
});
document.addEventListener("change", (ev) => {
  const tr = ev.target.closest("#iv-list tr"); if (!tr) return;
  const iv = state.interventions[Number(tr.dataset.i)];
  if (ev.target.classList.contains("iv-toggle")) iv.enabled = ev.target.checked;
  if (ev.target.classList.contains("iv-op")) iv.op = ev.target.value;
  if (ev.target.classList.contains("iv-value")) iv.value = Number(ev.target.value);
  if (ev.target.classList.contains("iv-positions")) iv.positions = parsePositions(ev.target.value);
});
$("trace-btn").addEventListener("click", doTrace);
$("value-btn").addEventListener("click", () => openValue($("value-label").value.trim()));
$("search-btn").addEventListener("click", doSearch);
$("iv-add").addEventListener("click", () => addIntervention($("iv-label").value, $("iv-op").value, $("iv-value").value, parsePositions($("iv-positions").value)));
$("gen-btn").addEventListener("click", doGenerate);
$("iv-save").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify({ interventions: state.interventions }, null, 2)], { type: "application/json" });
  const a = document.createElement("a"); a.href = URL.createObjectURL(blob); a.download = "interventions.json"; a.click();
});
$("iv-load").addEventListener("change", async (ev) => {
  const f = ev.target.files[0]; if (!f) return;
  let data;
  try { data = JSON.parse(await f.text()); } catch (e) { showError(`${f.name}: not JSON (${e.message})`); return; }
  try { const r = await api("/api/interventions/parse", Array.isArray(data) ? { interventions: data } : data);
    state.interventions = r.interventions.filter((iv) => iv.op !== "resid_add"); renderInterventions(); } catch (e) { /* shown */ }
  ev.target.value = "";
});
window.addEventListener("error", (ev) => showError(`page error: ${ev.message}`));
refreshInfo();
