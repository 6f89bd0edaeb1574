// tunesmith ui: one page, no build step. The Train form is generated from the config's JSON schema
// (GET /api/schema); every check is the server's (the CLI's own validation).
"use strict";
const $ = (id) => document.getElementById(id);
const S = { schema: null, fields: {}, current: null, metrics: [], since: 0, timer: null, runs: [], chat: {} };

function headers(extra) {
  const h = Object.assign({ "Content-Type": "application/json" }, extra || {});
  const key = localStorage.getItem("tunesmith-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function api(path, body, method) {
  const r = await fetch(path, { method: method || (body === undefined ? "GET" : "POST"), headers: headers(),
                                body: body === undefined ? undefined : JSON.stringify(body) });
  let data = {};
  try { data = await r.json(); } catch (e) { data = { error: r.statusText }; }
  data._status = r.status;
  return data;
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k === "html") e.innerHTML = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
const fmt = (x, d) => x == null ? "-" : (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(d ?? 4)) : String(x));

// ---- tabs ---------------------------------------------------------------------------------------
function show(tab) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== tab; });
  if (tab !== "train") refreshRuns();
}
document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => show(b.dataset.tab)));

// ---- the form, from the JSON schema ------------------------------------------------------------
function choices(prop) {
  // [value, label] pairs for a field that is a choice (enum, boolean, const), else null
  const alts = prop.anyOf || [prop];
  const out = [];
  for (const a of alts) {
    if (a.enum) a.enum.forEach((v) => out.push(v));
    else if (a.const !== undefined) out.push(a.const);
    else if (a.type === "boolean") out.push(true, false);
    else if (a.type === "null") out.push(null);
    else return null;
  }
  return out;
}
function textOf(v) { return v == null ? "" : (typeof v === "object" ? JSON.stringify(v) : String(v)); }

function fieldRow(key, prop, required) {
  const id = "f-" + key;
  let input;
  let opts = choices(prop);
  if (key === "train.objective") opts = ["auto", ...S.schema.objectives.map((o) => o.name)];
  if (key === "method.name") opts = Object.keys(S.schema.methods);
  if (opts) {
    input = el("select", { id });
    for (const v of opts) input.append(el("option", { value: JSON.stringify(v), text: v === null ? "null" : String(v) }));
    input.value = JSON.stringify(prop.default === undefined ? opts[0] : prop.default);
  } else {
    input = el("input", { id, size: 28 });
    input.value = textOf(prop.default);
    if (key === "model.name_or_path") input.setAttribute("list", "model-list");
  }
  let initial = input.value;
  if (key === "output.dir") { input.value = S.schema.output_dir; }
  S.fields[key] = { input, initial, choice: !!opts, required };
  input.addEventListener("change", touched);
  if (!opts) input.addEventListener("input", debounce(touched, 400));
  const label = el("label", { for: id, text: key + (required ? " *" : "") });
  const help = el("div", { class: "help", text: (prop.description || "") +
    (prop.default !== undefined ? "  (default: " + (textOf(prop.default) || "null") + ")" : "") });
  const row = el("div", { class: "field", id: "row-" + key }, label, input, help);
  if (key === "data.train") {
    const b = el("button", { id: "preview-btn", class: "small", text: "Preview" });
    b.addEventListener("click", preview);
    row.insertBefore(b, help);
  }
  return row;
}
function debounce(fn, ms) { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; }

function buildForm() {
  const sc = S.schema;
  const main = $("form-main"), more = $("form-more");
  main.innerHTML = ""; more.innerHTML = "";
  const dl = el("datalist", { id: "model-list" });
  [...sc.models.embedded, ...sc.models.random].forEach((m) => dl.append(el("option", { value: m })));
  main.append(dl);
  const folds = {};
  const method = { description: sc.run_description, default: "lora" };
  for (const key of sc.main_fields) {
    const [sec, name] = key.split(".");
    const s = sc.sections[sec];
    main.append(fieldRow(key, s.properties[name], (s.required || []).includes(name)));
    if (key === "model.name_or_path") main.append(fieldRow("method.name", method, true));
  }
  for (const [sec, s] of Object.entries(sc.sections)) {
    const d = el("details", { id: "more-" + sec }, el("summary", { text: "All " + sec + " fields" }));
    for (const [name, prop] of Object.entries(s.properties)) {
      if (!sc.main_fields.includes(sec + "." + name)) d.append(fieldRow(sec + "." + name, prop, false));
    }
    folds[sec] = d; more.append(d);
  }
  S.fields["method.name"].input.addEventListener("change", buildMethod);
  buildMethod();
}
function buildMethod() {
  const name = JSON.parse(S.fields["method.name"].input.value);
  for (const k of Object.keys(S.fields)) if (k.startsWith("method.") && k !== "method.name") delete S.fields[k];
  const m = S.schema.methods[name];
  $("method-summary").textContent = m.family + ": " + m.summary;
  const box = $("form-method");
  box.innerHTML = "";
  for (const [f, prop] of Object.entries(m.schema.properties)) if (f !== "name") box.append(fieldRow("method." + f, prop, false));
  onFormChange();
}
function formBody() {
  const fields = {}, typed = {};
  for (const [key, f] of Object.entries(S.fields)) {
    const v = f.input.value;
    if (key === "method.name") { typed[key] = JSON.parse(v); continue; }
    if (v === f.initial) continue;             // left at the config's default: not in the YAML
    if (f.choice) typed[key] = JSON.parse(v); else fields[key] = v;
  }
  return { fields, typed };
}
function touched() { S.touched = true; onFormChange(); }
async function onFormChange() {
  const r = await api("/api/validate", formBody());
  showCheck(r);
}
function showCheck(r) {
  $("yaml").textContent = r.yaml || "";
  document.querySelectorAll(".field.bad").forEach((e) => e.classList.remove("bad"));
  const box = $("form-error");
  if (!S.touched && r._status === 200) r = Object.assign({}, r, { error: null, field: null });  // not before the first edit
  box.hidden = !r.error;
  box.textContent = r.error ? "error: " + r.error : "";
  if (r.field && $("row-" + r.field)) $("row-" + r.field).classList.add("bad");
}
$("copy-yaml").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText($("yaml").textContent); } catch (e) { /* not a secure context */ }
  const sel = window.getSelection(), range = document.createRange();
  range.selectNodeContents($("yaml")); sel.removeAllRanges(); sel.addRange(range);
});

async function preview() {
  const path = S.fields["data.train"].input.value;
  const r = await api("/api/preview", { path });
  const box = $("preview");
  box.innerHTML = "";
  if (r.error) { box.append(el("div", { class: "error", text: r.error })); $("preview-format").textContent = ""; return; }
  $("preview-format").textContent = r.format ? "format: " + r.format : "format: ?";
  if (r.format_error) box.append(el("div", { class: "error", text: r.format_error }));
  const keys = [...new Set(r.rows.flatMap((x) => Object.keys(x)))];
  const t = el("table", { class: "table", id: "preview-table" });
  t.append(el("tr", {}, el("th", { text: "row" }), ...keys.map((k) => el("th", { text: k }))));
  r.rows.forEach((row, i) => t.append(el("tr", {}, el("td", { text: r.locs[i].split(":").pop() }),
    ...keys.map((k) => el("td", { text: textOf(row[k]) })))));
  box.append(t);
}

// ---- start, progress, stop, resume -------------------------------------------------------------
$("start-btn").addEventListener("click", async () => {
  S.touched = true;
  const r = await api("/api/runs", formBody());
  if (r._status !== 200) { showCheck(r.yaml !== undefined ? r : { yaml: $("yaml").textContent, error: r.error }); return; }
  $("yaml").textContent = r.yaml;
  $("form-error").hidden = true;
  follow(r.name);
});
$("estimate-btn").addEventListener("click", async () => {
  const r = await api("/api/estimate", formBody());
  const out = $("estimate-out");
  out.hidden = false;
  if (r.yaml !== undefined && r.error) { showCheck(r); out.hidden = true; return; }
  out.className = "out" + (r.ok ? "" : " error");
  out.textContent = r.ok ? r.stdout : r.message || r.error;
});
function follow(name) {
  S.current = name; S.metrics = []; S.since = 0;
  $("progress").hidden = false;
  $("run-name").textContent = name;
  clearInterval(S.timer);
  S.timer = setInterval(poll, 1000);
  poll();
}
async function poll() {
  const name = S.current;
  const r = await api("/api/runs/" + encodeURIComponent(name).replace(/%2F/g, "/") + "?since=" + S.since);
  if (r._status !== 200 || name !== S.current) return;
  S.metrics.push(...r.metrics);
  S.since = r.metrics_total;
  const p = r.progress;
  $("run-status").textContent = r.status;
  $("run-status").className = "badge " + r.status;
  $("prog-step").textContent = p.step + (p.total ? " / " + p.total : "");
  $("prog-loss").textContent = fmt(p.loss);
  $("prog-toks").textContent = fmt(p.tokens_per_s, 0);
  $("prog-eta").textContent = r.status === "running" ? (p.eta || "-") : "-";
  $("prog-bar").style.width = (p.total ? Math.min(100, 100 * p.step / p.total) : 0) + "%";
  $("log-tail").textContent = (r.reason ? "error: " + r.reason + "\n\n" : "") + r.log_tail;
  $("stop-btn").disabled = r.status !== "running";
  $("resume-btn").disabled = !r.resumable;
  drawChart($("train-chart"), curves(S.metrics, ""));
  if (!["running", "stopping"].includes(r.status)) { clearInterval(S.timer); S.timer = setInterval(poll, 5000); }
}
$("stop-btn").addEventListener("click", () => api("/api/runs/" + S.current + "/stop", {}));
$("resume-btn").addEventListener("click", async () => {
  const r = await api("/api/runs/" + S.current + "/resume", {});
  if (r.error) { $("log-tail").textContent = "error: " + r.error; return; }
  follow(S.current);
});

// ---- charts (SVG, no library) --------------------------------------------------------------------
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#65a30d"];
function curves(records, prefix, ci) {
  const train = records.filter((r) => r.split === "train").map((r) => [r.step, r.loss]);
  const ev = records.filter((r) => r.split === "eval").map((r) => [r.step, r.loss]);
  const c = COLORS[(ci || 0) % COLORS.length];
  return [{ name: prefix + "train", points: train, color: c }, { name: prefix + "eval", points: ev, color: c, dash: true }];
}
function drawChart(svg, series) {
  const W = 600, H = 260, L = 50, R = 10, T = 10, B = 30;
  svg.innerHTML = "";
  const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, a) => { const e = document.createElementNS(ns, tag); for (const k in a) e.setAttribute(k, a[k]); svg.append(e); return e; };
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafafa", stroke: "#ddd" });
  if (!pts.length) { const t = add("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#999" }); t.textContent = "no loss yet"; return; }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (y1 - y) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, t = add("text", { x: L - 4, y: sy(y) + 4, "text-anchor": "end", "font-size": 10, fill: "#666" });
    t.textContent = y.toFixed(3);
    const xv = x0 + (x1 - x0) * i / 4, u = add("text", { x: sx(xv), y: H - 12, "text-anchor": "middle", "font-size": 10, fill: "#666" });
    u.textContent = Math.round(xv);
  }
  const lab = add("text", { x: W / 2, y: H - 1, "text-anchor": "middle", "font-size": 10, fill: "#666" }); lab.textContent = "step";
  let ly = T + 12;
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join("");
    add("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.5, "stroke-dasharray": s.dash ? "5,3" : "", class: "curve" });
    if (s.points.length < 30) s.points.forEach((p) => add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2, fill: s.color }));
    const t = add("text", { x: W - R - 6, y: ly, "text-anchor": "end", "font-size": 11, fill: s.color }); t.textContent = s.name;
    ly += 13;
  }
}

// ---- runs ---------------------------------------------------------------------------------------
const COLS = [["status", "status"], ["method", "method"], ["model", "model"], ["steps", "steps"],
  ["trainable_pct", "trainable %"], ["train_loss_after", "train loss"], ["eval_loss_after", "eval loss"],
  ["eval_accuracy_after", "eval acc"], ["tokens_per_s", "tokens/s"], ["time_s", "time s"]];
const cell = (r, k) => ["status", "method", "model"].includes(k) ? r[k] : (k === "steps" ? (r.summary.steps ?? r.progress.step) : r.summary[k]);
async function refreshRuns() {
  const runs = await api("/api/runs");
  if (!Array.isArray(runs)) return;
  const sig = JSON.stringify(runs);
  if (sig === S.runsSig) return;            // unchanged: keep the rows (and what is selected)
  S.runsSig = sig; S.runs = runs;
  const t = $("runs-table");
  const checked = new Set([...t.querySelectorAll("input:checked")].map((c) => c.value));
  t.tHead.innerHTML = ""; t.tBodies[0].innerHTML = "";
  t.tHead.append(el("tr", {}, el("th", { text: "" }), el("th", { text: "run" }), ...COLS.map(([, h]) => el("th", { text: h }))));
  for (const r of runs) {
    const box = el("input", { type: "checkbox", value: r.name, class: "pick" });
    box.checked = checked.has(r.name);
    const link = el("a", { href: "#", text: r.name, class: "run-link", "data-run": r.name });
    link.addEventListener("click", (e) => { e.preventDefault(); detail(r.name); });
    t.tBodies[0].append(el("tr", { "data-run": r.name }, el("td", {}, box), el("td", {}, link),
      ...COLS.map(([k]) => el("td", { class: k === "status" ? "badge " + r.status : "", text: fmt(cell(r, k), k.includes("loss") ? 4 : 2) }))));
  }
  const finished = runs.filter((r) => r.artifact);
  for (const id of ["eval-run", "export-run"]) fillSelect($(id), finished.map((r) => [r.name, r.name]));
  const bases = [...new Set(finished.map((r) => r.model).filter(Boolean))];
  const opts = [["", "(none)"], ...bases.map((b) => ["base:" + b, "base: " + b]), ...finished.map((r) => ["run:" + r.name, "run: " + r.name])];
  for (const id of ["chat-left-model", "chat-right-model"]) fillSelect($(id), opts);
}
function fillSelect(sel, opts) {
  const keep = sel.value;
  sel.innerHTML = "";
  for (const [v, t] of opts) sel.append(el("option", { value: v, text: t }));
  if (opts.some(([v]) => v === keep)) sel.value = keep;
}
async function detail(name) {
  const r = await api("/api/runs/" + name + "?since=0");
  $("run-detail").hidden = false;
  $("detail-name").textContent = name;
  $("detail-status").textContent = r.status; $("detail-status").className = "badge " + r.status;
  $("detail-reason").hidden = !r.reason; $("detail-reason").textContent = r.reason || "";
  drawChart($("detail-chart"), curves(r.metrics, ""));
  $("detail-stop").onclick = () => api("/api/runs/" + name + "/stop", {}).then(() => detail(name));
  $("detail-resume").onclick = () => api("/api/runs/" + name + "/resume", {}).then(() => { show("train"); follow(name); });
  $("detail-stop").disabled = r.status !== "running";
  $("detail-resume").disabled = !r.resumable;
}
$("refresh-runs").addEventListener("click", refreshRuns);
$("compare-btn").addEventListener("click", async () => {
  const names = [...document.querySelectorAll("#runs-table input:checked")].map((c) => c.value);
  const r = await api("/api/compare", { runs: names });
  if (r.error) return;
  $("compare-out").hidden = false;
  const t = $("compare-table");
  t.innerHTML = "";
  t.append(el("tr", {}, el("th", { text: "run" }), ...COLS.map(([, h]) => el("th", { text: h }))));
  r.runs.forEach((x) => t.append(el("tr", {}, el("td", { text: x.name }), ...COLS.map(([k]) => el("td", { text: fmt(cell(x, k), 4) })))));
  drawChart($("compare-chart"), r.runs.flatMap((x, i) => curves(x.metrics, x.name + " ", i)));
  $("compare-tool").textContent = r.table.ok ? (r.table.stdout || "") : r.table.message;
});
setInterval(() => { if (!$("runs").hidden) refreshRuns(); }, 3000);

// ---- evaluate -----------------------------------------------------------------------------------
$("eval-btn").addEventListener("click", async () => {
  const out = $("eval-out");
  out.hidden = false; out.className = "out"; out.textContent = "evaluating…";
  const r = await api("/api/eval", { run: $("eval-run").value, data: $("eval-data").value, max_samples: $("eval-max").value });
  out.className = "out" + (r.ok ? "" : " error");
  out.textContent = r.ok ? r.stdout : (r.message || r.error) + (r.stderr ? "\n\n" + r.stderr : "");
  const preds = $("eval-preds");
  preds.innerHTML = "";
  if (r.predictions && r.predictions.length) {
    const keys = [...new Set(r.predictions.flatMap((x) => Object.keys(x)))];
    preds.append(el("tr", {}, ...keys.map((k) => el("th", { text: k }))));
    r.predictions.forEach((p) => preds.append(el("tr", {}, ...keys.map((k) => el("td", { text: textOf(p[k]) })))));
  }
});

// ---- chat ---------------------------------------------------------------------------------------
function chatSide(side) { return S.chat[side] || (S.chat[side] = { history: [], open: null, key: "" }); }
$("chat-reset").addEventListener("click", () => { S.chat = {}; $("chat-left-log").innerHTML = ""; $("chat-right-log").innerHTML = ""; });
async function openSide(side) {
  const pick = $("chat-" + side + "-model").value, st = chatSide(side);
  if (!pick) return null;
  if (st.key !== pick) {
    const [kind, name] = [pick.slice(0, pick.indexOf(":")), pick.slice(pick.indexOf(":") + 1)];
    const r = await api("/api/chat/open", kind === "run" ? { run: name } : { base: name });
    if (r.error) throw new Error(r.error);
    Object.assign(st, { open: r, key: pick, history: [] });
    $("chat-" + side + "-log").innerHTML = "";
  }
  return st;
}
async function ask(side, text) {
  const log = $("chat-" + side + "-log");
  let st;
  try { st = await openSide(side); } catch (e) { log.append(el("div", { class: "msg error", text: e.message })); return; }
  if (!st) return;
  st.history.push({ role: "user", content: text });
  log.append(el("div", { class: "msg user", text: text }));
  const out = el("div", { class: "msg assistant streaming" });
  log.append(out);
  const body = { model: st.open.model, messages: st.history, stream: true, max_tokens: parseInt($("chat-max").value) || 64,
                 temperature: parseFloat($("chat-temp").value) || 0 };
  const r = await fetch(st.open.url, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!r.ok) { const e = await r.json(); out.classList.add("error"); out.textContent = (e.error && e.error.message) || e.error; return; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", reply = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.error) { out.classList.add("error"); reply += " [" + ev.error.message + "]"; }
      for (const c of ev.choices || []) if (c.delta && c.delta.content) reply += c.delta.content;
      out.textContent = reply;
    }
  }
  out.classList.remove("streaming"); out.classList.add("done");
  st.history.push({ role: "assistant", content: reply });
}
$("chat-send").addEventListener("click", () => {
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  ask("left", text); ask("right", text);
});
$("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter") $("chat-send").click(); });

// ---- export -------------------------------------------------------------------------------------
$("export-btn").addEventListener("click", async () => {
  const target = $("export-target").value, out = $("export-out");
  out.hidden = false; out.className = "out"; out.textContent = "working…";
  const body = { run: $("export-run").value, target, rank: $("export-rank").value, fold_rslora: $("export-fold").checked,
                 out: $("export-outdir").value || null };
  const r = await api(target === "merge" ? "/api/merge" : "/api/export", body);
  out.className = "out " + (r.ok ? "ok" : "error");
  out.textContent = r.message || r.error;
});

// ---- start --------------------------------------------------------------------------------------
(async function init() {
  const info = await api("/api/info");
  $("runs-dir").textContent = "runs: " + info.runs_dir;
  if (info.auth) {
    $("auth").hidden = false;
    $("api-key").value = localStorage.getItem("tunesmith-key") || "";
    $("api-key").addEventListener("change", () => { localStorage.setItem("tunesmith-key", $("api-key").value); location.reload(); });
  }
  S.schema = await api("/api/schema");
  if (S.schema._status !== 200) { $("form-main").textContent = "error: " + S.schema.error; return; }
  buildForm();
  refreshRuns();
  document.body.dataset.ready = "1";
})();
