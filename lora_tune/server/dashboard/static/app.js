// lora-tune dashboard: one page, hash routes (#/runs, #/run/NAME, #/compare/A,B, #/jobs, #/playground).
// Reads the server's read-only run API (/dashboard/api/...) and its OpenAI routes; no libraries, nothing
// fetched from elsewhere. Charts are SVG drawn here.
"use strict";

const main = document.getElementById("main");
const COLORS = ["#2f6fde", "#d1495b", "#2a9d8f", "#e9a23b", "#7b5ea7", "#4d908e", "#c05640", "#577590"];
let key = localStorage.getItem("lora_tune_api_key") || "";
let timers = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString();
  return Math.abs(v) >= 1000 ? Math.round(v).toLocaleString() : v.toFixed(digits);
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (key) headers.Authorization = "Bearer " + key;
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 401) {
    document.getElementById("key-form").hidden = false;
    throw new Error("this server needs its API key: type it at the top right");
  }
  if (!r.ok) {
    let msg = `${r.status}`;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}
const getJSON = async (path) => (await api(path)).json();

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = document.getElementById("key").value;
  localStorage.setItem("lora_tune_api_key", key);
  document.getElementById("key-form").hidden = true;
  route();
});

function show(...nodes) {
  main.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
}

function failure(e) {
  show(el("p", { class: "error" }, String(e.message || e)));
}

// ---------------------------------------------------------------------------------------------------
// charts

// series: [{name, points: [[x, y], ...], color}]; the SVG's data-points holds the first series' count
function lineChart(title, series) {
  const W = 640, H = 240, L = 56, R = 12, T = 12, B = 28;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const box = el("div", { class: "chart", dataset: { title } }, el("div", {}, el("b", {}, title)));
  box.dataset.points = String(series.length ? series[0].points.length : 0);
  series.forEach((s, i) => { box.dataset["points" + i] = String(s.points.length); });
  if (!all.length) {
    box.append(el("p", { class: "muted" }, "no points yet"));
    return box;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 = y0 >= 0 && y0 - pad < 0 ? 0 : y0 - pad;  // a curve of positive values keeps a non-negative axis
  y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svgEl = (tag, attrs) => {
    const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  };
  for (let i = 0; i <= 4; i++) {  // grid and y ticks
    const y = y0 + (i / 4) * (y1 - y0);
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#e6e8ee" }));
    const t = svgEl("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7385" });
    t.textContent = Math.abs(y) < 0.01 && y !== 0 ? y.toExponential(1) : y.toPrecision(3);
    svg.append(t);
  }
  for (let i = 0; i <= 4; i++) {  // x ticks
    const x = x0 + (i / 4) * (x1 - x0);
    const t = svgEl("text", { x: sx(x), y: H - 8, "text-anchor": "middle", "font-size": 11, fill: "#6b7385" });
    t.textContent = String(Math.round(x));
    svg.append(t);
  }
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    const color = s.color || COLORS[i % COLORS.length];
    if (pts.length > 1) {
      svg.append(svgEl("polyline", {
        points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": s.width || 1.6, "stroke-dasharray": s.dashed ? "5 3" : "",
      }));
    }
    if (s.dots || pts.length === 1) {
      for (const p of pts) svg.append(svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: color }));
    }
  });
  box.append(svg);
  box.append(el("div", { class: "legend" }, series.map((s, i) =>
    el("span", {}, el("i", { style: `background:${s.color || COLORS[i % COLORS.length]}` }), s.name))));
  return box;
}

function curves(records) {
  const train = records.filter((r) => (r.split || "train") === "train");
  const val = records.filter((r) => r.split === "val");
  const pick = (rows, k) => rows.filter((r) => typeof r[k] === "number").map((r) => [r.step, r[k]]);
  return { train, val, pick };
}

// ---------------------------------------------------------------------------------------------------
// runs

const RUN_COLUMNS = [
  ["name", "run"], ["base_model", "base model"], ["objective", "objective"], ["quantization", "weights"],
  ["status", "status"], ["steps", "steps", true], ["best_val_loss", "best val loss", true],
  ["tokens_per_s", "tokens/s", true], ["started", "started", true],
];
let runSort = { key: "started", desc: true };

async function pageRuns() {
  const t0 = performance.now();
  const data = await getJSON("/dashboard/api/runs");
  const rows = data.runs.slice();
  const table = el("table", { id: "runs" });
  const render = () => {
    const { key: k, desc } = runSort;
    rows.sort((a, b) => {
      const [x, y] = [a[k], b[k]];
      const c = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return desc ? -c : c;
    });
    const head = el("tr", {}, el("th", {}, ""), RUN_COLUMNS.map(([k2, label, num]) => el("th", {
      class: [num ? "num" : "", runSort.key === k2 ? "sorted" : "", runSort.key === k2 && !runSort.desc ? "asc" : ""].join(" "),
      dataset: { key: k2 },
      // a first click sorts numbers largest first, but losses smallest first (the best on top)
      onclick: () => { runSort = { key: k2, desc: runSort.key === k2 ? !runSort.desc : num && k2 !== "best_val_loss" }; render(); },
    }, label)));
    const body = rows.map((r) => el("tr", { dataset: { run: r.name } },
      el("td", {}, el("input", { type: "checkbox", class: "pick", value: r.name })),
      el("td", {}, el("a", { href: `#/run/${encodeURIComponent(r.name)}` }, r.name)),
      el("td", {}, r.base_model || "–"), el("td", {}, r.objective), el("td", {}, r.quantization || "–"),
      el("td", {}, el("span", { class: "status " + r.status.replace(" ", "-") }, r.status)),
      el("td", { class: "num" }, `${fmt(r.steps)}${r.total_steps ? " / " + fmt(r.total_steps) : ""}`),
      el("td", { class: "num" }, fmt(r.best_val_loss)), el("td", { class: "num" }, fmt(r.tokens_per_s, 0)),
      el("td", { class: "num" }, when(r.started))));
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, body));
  };
  render();
  const compare = el("button", { onclick: compareTicked }, "Compare selected");
  show(el("h1", {}, `Runs (${rows.length})`), el("p", { class: "muted" }, data.root), compare, table);
  document.body.dataset.renderedMs = String(Math.round(performance.now() - t0));
}

async function pageRun(name) {
  const detail = await getJSON(`/dashboard/api/runs/${encodeURIComponent(name)}`);
  let records = [], next = 0;
  const chartsBox = el("div", { class: "charts", id: "charts" });
  const statusLine = el("p", {});
  const draw = () => {
    const { train, val, pick } = curves(records);
    const charts = [lineChart("loss", [
      { name: "train", points: pick(train, "loss") },
      { name: "validation", points: pick(val, "loss"), dots: true, width: 2.2 },
    ])];
    charts[0].id = "loss-chart";
    charts.push(lineChart("learning rate", [{ name: "lr", points: pick(train, "lr") }]));
    if (train.some((r) => "token_accuracy" in r)) {
      charts.push(lineChart("token accuracy", [
        { name: "train", points: pick(train, "token_accuracy") },
        { name: "validation", points: pick(val, "token_accuracy"), dots: true },
      ]));
    }
    if (train.some((r) => "rewards/margins" in r)) {
      charts.push(lineChart("reward margin", [
        { name: "train", points: pick(train, "rewards/margins") },
        { name: "validation", points: pick(val, "rewards/margins"), dots: true },
      ]));
    }
    chartsBox.replaceChildren(...charts);
    const last = train[train.length - 1];
    statusLine.replaceChildren(
      el("span", { class: "status " + detail.status.replace(" ", "-"), id: "run-status" }, detail.status), " ",
      last ? `step ${last.step}${detail.total_steps ? " of " + detail.total_steps : ""}, loss ${fmt(last.loss)}` : "no step yet");
  };
  const poll = async () => {
    const got = await getJSON(`/dashboard/api/runs/${encodeURIComponent(name)}/metrics?after=${next}`);
    if (got.records.length) records = records.concat(got.records);
    next = got.next;
    if (got.records.length || !records.length) draw();
  };
  await poll();
  timers.push(setInterval(async () => {
    try {
      await poll();
      if (detail.status === "running") {
        const fresh = await getJSON(`/dashboard/api/runs/${encodeURIComponent(name)}`);
        if (fresh.status !== detail.status) { Object.assign(detail, fresh); draw(); }
      }
    } catch (e) { /* the next tick tries again */ }
  }, 1500));
  const evals = detail.evaluations.map((ev) => el("div", {},
    el("h2", {}, `Evaluation: ${ev.file}`),
    el("table", { class: "eval" }, el("tr", {}, el("th", {}, "metric"), ev.sides.map((s) => el("th", { class: "num" }, s)),
      el("th", { class: "num" }, "delta")),
      Object.entries(ev.metrics).map(([m, v]) => el("tr", {}, el("td", {}, m),
        ev.sides.map((s) => el("td", { class: "num" }, fmt(v[s]))), el("td", { class: "num" }, fmt(ev.delta[m])))))));
  show(
    el("h1", {}, name), statusLine,
    el("p", { class: "muted" }, `${detail.base_model || "?"} · ${detail.objective} · ${detail.quantization || "?"} · ${detail.path}`),
    detail.error ? el("p", { class: "error" }, detail.error) : null,
    chartsBox,
    ...evals,
    el("h2", {}, "Adapter"),
    detail.adapter ? el("div", {}, el("p", {}, el("code", {}, detail.adapter)),
      el("pre", { id: "commands" }, detail.commands.join("\n"))) : el("p", { class: "muted" }, "no adapter yet"),
    el("h2", {}, `Checkpoints (${detail.checkpoints.length})`),
    el("ul", {}, detail.checkpoints.map((c) => el("li", {}, `${c.name} · ${when(c.time)}`))),
    el("h2", {}, "Config"),
    el("pre", { id: "config" }, detail.config || "(none)"),
  );
  draw();
}

// the compare page of the runs whose boxes are ticked (on the runs page, or on compare's own list)
function compareTicked() {
  const picked = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
  location.hash = "#/compare/" + picked.map(encodeURIComponent).join(",");
}

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    const name = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, name, out);
    else out[name] = JSON.stringify(v);
  }
  return out;
}

async function pageCompare(names) {
  if (names.length < 2) {
    const data = await getJSON("/dashboard/api/runs");
    show(el("h1", {}, "Compare"), el("p", {}, "Pick two or more runs on the Runs page (the boxes on the left), or here:"),
      el("ul", {}, data.runs.map((r) => el("li", {}, el("label", {}, el("input", { type: "checkbox", class: "pick", value: r.name }), " ", r.name)))),
      el("button", { onclick: compareTicked }, "Compare"));
    return;
  }
  const runs = await Promise.all(names.map(async (n) => {
    const [detail, metrics] = await Promise.all([
      getJSON(`/dashboard/api/runs/${encodeURIComponent(n)}`),
      getJSON(`/dashboard/api/runs/${encodeURIComponent(n)}/metrics`),
    ]);
    return { name: n, detail, records: metrics.records };
  }));
  const trainSeries = [], valSeries = [];
  runs.forEach((r, i) => {
    const { train, val, pick } = curves(r.records);
    trainSeries.push({ name: r.name, points: pick(train, "loss"), color: COLORS[i % COLORS.length] });
    valSeries.push({ name: r.name, points: pick(val, "loss"), color: COLORS[i % COLORS.length], dots: true });
  });
  const flat = runs.map((r) => flatten(r.detail.config_values));
  const keys = [...new Set(flat.flatMap((f) => Object.keys(f)))].sort();
  const differing = keys.filter((k) => new Set(flat.map((f) => f[k])).size > 1);
  const train = lineChart("training loss", trainSeries);
  train.id = "compare-train";
  const val = lineChart("validation loss", valSeries);
  show(
    el("h1", {}, `Compare: ${names.join(", ")}`),
    el("div", { class: "charts" }, train, val),
    el("h2", {}, `Config differences (${differing.length} of ${keys.length} settings)`),
    el("table", { class: "diff", id: "config-diff" },
      el("tr", {}, el("th", {}, "setting"), runs.map((r) => el("th", {}, r.name))),
      differing.map((k) => el("tr", {}, el("td", {}, k), flat.map((f) => el("td", { class: "changed" }, f[k] ?? "–"))))),
  );
}

// ---------------------------------------------------------------------------------------------------
// jobs

async function pageJobs() {
  let data;
  try {
    data = await getJSON("/v1/fine_tuning/jobs?limit=100");
  } catch (e) {
    show(el("h1", {}, "Fine-tuning jobs"), el("p", { class: "muted" }, `The jobs API is not available here (${e.message}).`));
    return;
  }
  const events = el("div", { id: "events" });
  const table = el("table", { id: "jobs" },
    el("tr", {}, ["job", "model", "status", "created", "trained tokens", "fine-tuned model"].map((h) => el("th", {}, h))),
    data.data.map((j) => el("tr", { dataset: { job: j.id } },
      el("td", {}, el("a", { href: "#/jobs", onclick: (ev) => { ev.preventDefault(); showEvents(j.id, events); } }, j.id)),
      el("td", {}, j.model), el("td", {}, el("span", { class: "status " + j.status }, j.status)),
      el("td", {}, when(j.created_at)), el("td", { class: "num" }, fmt(j.trained_tokens)),
      el("td", {}, j.fine_tuned_model || "–"))));
  show(el("h1", {}, `Fine-tuning jobs (${data.data.length})`), table, events);
}

async function showEvents(id, box) {
  const data = await getJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=100`);
  box.replaceChildren(el("h2", {}, `Events of ${id}`),
    el("table", {}, data.data.map((e) => el("tr", {}, el("td", {}, when(e.created_at)), el("td", {}, e.level), el("td", {}, e.message)))));
}

// ---------------------------------------------------------------------------------------------------
// playground

async function pagePlayground() {
  const models = (await getJSON("/v1/models")).data;
  const picks = el("div", { id: "models" }, models.map((m, i) => el("label", { style: "margin-right:1rem" },
    el("input", { type: "checkbox", class: "model", value: m.id, checked: i < 2 }), " ", m.id)));
  const num = (id, label, value, step) => el("label", {}, label, el("input", { id, type: "number", value, step, style: "width:6rem" }));
  const controls = el("div", { class: "controls" },
    num("temperature", "temperature", 0.7, 0.1), num("top_p", "top_p", 1, 0.05),
    num("max_tokens", "max tokens", 128, 1), num("seed", "seed", 0, 1));
  const system = el("textarea", { id: "system", placeholder: "system prompt (optional)" });
  const prompt = el("textarea", { id: "prompt", placeholder: "your message" });
  const cols = el("div", { class: "cols", id: "replies" });
  const histories = {};
  const send = el("button", { id: "send", onclick: async () => {
    const chosen = [...document.querySelectorAll("input.model:checked")].map((c) => c.value);
    const text = prompt.value.trim();
    if (!text || !chosen.length) return;
    prompt.value = "";
    await Promise.all(chosen.map((m) => stream(m, text)));
  } }, "Send to each selected model");
  const column = (model) => {
    let col = cols.querySelector(`[data-model="${CSS.escape(model)}"]`);
    if (!col) {
      col = el("div", { dataset: { model } }, el("b", {}, model), el("div", { class: "reply" }));
      cols.append(col);
    }
    return col.querySelector(".reply");
  };
  async function stream(model, text) {
    const box = column(model);
    const history = histories[model] = histories[model] || [];
    if (!history.length && system.value.trim()) history.push({ role: "system", content: system.value.trim() });
    history.push({ role: "user", content: text });
    box.append(el("div", { class: "turn" }, el("b", {}, "you: "), text));
    const out = el("span", { class: "answer", dataset: { chunks: "0", done: "false" } });
    box.append(el("div", { class: "turn" }, el("b", {}, "model: "), out));
    const body = {
      model, messages: history, stream: true,
      temperature: +document.getElementById("temperature").value, top_p: +document.getElementById("top_p").value,
      max_tokens: +document.getElementById("max_tokens").value, seed: +document.getElementById("seed").value,
    };
    try {
      const r = await api("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "", answer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") continue;
          const chunk = JSON.parse(payload);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
          if (delta) {
            answer += delta;
            out.textContent = answer;
            out.dataset.chunks = String(+out.dataset.chunks + 1);
          }
        }
      }
      history.push({ role: "assistant", content: answer });
    } catch (e) {
      out.append(el("span", { class: "error" }, ` [${e.message}]`));
    }
    out.dataset.done = "true";
  }
  show(el("h1", {}, "Playground"), el("p", { class: "muted" }, "Each selected model answers the same message, streamed; each keeps its own conversation."),
    picks, controls, system, prompt, send, cols);
}

// ---------------------------------------------------------------------------------------------------

async function route() {
  timers.forEach(clearInterval);
  timers = [];
  const hash = location.hash || "#/runs";
  const [, page, arg] = hash.match(/^#\/([a-z]+)\/?(.*)$/) || [null, "runs", ""];
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === (page === "run" ? "runs" : page)));
  document.body.dataset.page = page;
  document.body.dataset.ready = "false";
  try {
    if (page === "run") await pageRun(decodeURIComponent(arg));
    else if (page === "compare") await pageCompare(arg ? arg.split(",").map(decodeURIComponent).filter(Boolean) : []);
    else if (page === "jobs") await pageJobs();
    else if (page === "playground") await pagePlayground();
    else await pageRuns();
  } catch (e) {
    failure(e);
  }
  document.body.dataset.ready = "true";
}

window.addEventListener("hashchange", route);
route();
